"""RateMeter: rates follow real steps; the start-up probe measures a real engine."""

from __future__ import annotations

import pytest

from replicas.rate_meter import RateMeter


def test_rates_are_ratios_of_ewmas_and_split_by_step_kind() -> None:
    m = RateMeter(alpha=0.5)
    assert m.rates().prefill_tokens_per_s == 0.0 and m.rates().decode_tokens_per_s == 0.0
    m.observe(100, 4, 1.0)  # a mixed step counts as prefill
    assert m.rates().prefill_tokens_per_s == pytest.approx(100.0)
    m.observe(300, 0, 1.0)  # tokens 100 -> 200, seconds 1 -> 1
    assert m.rates().prefill_tokens_per_s == pytest.approx(200.0)
    m.observe(0, 8, 0.5)
    assert m.rates().decode_tokens_per_s == pytest.approx(16.0)
    assert m.rates().prefill_tokens_per_s == pytest.approx(200.0)
    m.observe(0, 0, 1.0)
    m.observe(5, 0, 0.0)
    assert m.num_steps == 3


def test_a_slowdown_shows_within_a_few_steps() -> None:
    m = RateMeter()
    for _ in range(20):
        m.observe(512, 0, 0.02)
    fast = m.rates().prefill_tokens_per_s
    for _ in range(20):
        m.observe(512, 0, 0.06)
    slow = m.rates().prefill_tokens_per_s
    assert fast == pytest.approx(512 / 0.02)
    assert slow < 0.45 * fast


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
