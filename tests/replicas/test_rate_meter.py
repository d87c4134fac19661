"""RateMeter: rates from the step-time fit of real steps; the start-up probe measures a real
engine."""

from __future__ import annotations

import pytest

from replicas.rate_meter import RATE_EWMA_ALPHA, RateMeter, Rates


def test_mixed_steps_are_split_by_the_fit_not_counted_as_prefill() -> None:
    """A busy replica's steps mix prompt chunks and decode rows; the rates come from the fit
    (fixed + c_p·P + c_d·D), not from the mixed steps' whole time charged to prefill."""
    fixed, c_p, c_d = 0.010, 4e-5, 1e-3
    m = RateMeter(alpha=0.1)
    assert m.rates() == Rates()  # nothing measured yet
    for i in range(200):
        p, d = (256 + 64 * (i % 7), 8 + i % 24) if i % 3 else (0, 8 + i % 24)
        m.observe(p, d, fixed + c_p * p + c_d * d)
    r = m.rates()
    p_mean, d_mean = m.fit.mean_prefill_tokens, m.fit.mean_decode_tokens
    assert 256 <= p_mean <= 640 and 8 <= d_mean <= 31
    assert r.prefill_tokens_per_s == pytest.approx(p_mean / (fixed + c_p * p_mean), rel=0.02)
    assert r.decode_tokens_per_s == pytest.approx(d_mean / (fixed + c_d * d_mean), rel=0.02)
    # what the meter before the fit reported: prompt tokens / whole time of the mixed steps
    mixed = [(256 + 64 * (i % 7), 8 + i % 24) for i in range(200) if i % 3]
    old = sum(p for p, _ in mixed) / sum(fixed + c_p * p + c_d * d for p, d in mixed)
    assert old < 0.7 * r.prefill_tokens_per_s


def test_a_kind_of_step_never_seen_has_no_rate() -> None:
    m = RateMeter()
    m.observe(0, 8, 0.05)
    assert m.rates().prefill_tokens_per_s == 0.0 and m.rates().decode_tokens_per_s > 0.0
    m.observe(0, 0, 1.0)
    m.observe(5, 0, 0.0)
    assert m.num_steps == 1


@pytest.mark.parametrize("alpha", [0.1, RATE_EWMA_ALPHA])
def test_a_slowdown_shows_within_a_few_steps(alpha: float) -> None:
    """A replica at a third of its speed: the reported rates fall below half within 1.5/α
    steps (15 at α = 0.1, 75 at the default 0.02), and are back above 0.8x within twice that."""
    m = RateMeter(alpha=alpha)

    def run(num_steps: int, speed: float) -> None:
        for i in range(num_steps):
            p, d = (512 - 32 * (i % 4), 2 + i % 5) if i % 2 else (0, 2 + i % 5)
            m.observe(p, d, (0.002 + 4e-5 * p + 1e-4 * d) / speed)

    run(200, 1.0)
    fast = m.rates()
    p_mean = m.fit.mean_prefill_tokens
    assert fast.prefill_tokens_per_s == pytest.approx(p_mean / (0.002 + 4e-5 * p_mean), rel=0.02)
    n = round(1.5 / alpha)
    run(n, 1 / 3)
    slow = m.rates()
    assert slow.prefill_tokens_per_s < 0.5 * fast.prefill_tokens_per_s
    assert slow.decode_tokens_per_s < 0.5 * fast.decode_tokens_per_s
    run(2 * n, 1.0)  # NOTE: a rate is 1 / time: the slow steps' last 5% of weight shows ~10%
    assert m.rates().prefill_tokens_per_s > 0.8 * fast.prefill_tokens_per_s


def test_bad_alpha_is_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        RateMeter(alpha=0.0)


def test_calibrate_measures_a_real_engine_and_leaves_no_trace(tiny_llama_dir: object) -> None:
    from replicas.config import EngineConfig
    from replicas.llm_engine import LLMEngine
    from replicas.rate_meter import calibrate
    from replicas.sampling_params import SamplingParams

    eng = LLMEngine(
        EngineConfig(model=str(tiny_llama_dir), num_blocks=48, block_size=4, max_model_len=128)
    )
    rates = calibrate(eng, num_prompt_tokens=64, num_decode_steps=4)
    assert rates.prefill_tokens_per_s > 0 and rates.decode_tokens_per_s > 0
    st = eng.stats()
    assert st.num_cached_blocks == 0 and st.num_free_blocks == st.num_blocks
    assert eng.take_events() == []  # the probe's blocks never reach the selection service
    eng.generate([[1, 2, 3, 4, 5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0.0))
    assert eng.rates.num_steps > 1 + 3  # real steps keep feeding the meter
