"""StepTimeFit: the online fit recovers a step-time model from mixed steps, keeps a coefficient
that recent steps do not exercise, stays non-negative, and follows a replica that slows down."""

from __future__ import annotations

import random

import pytest

from replicas.step_fit import StepCoefficients, StepTimeFit

TRUE = StepCoefficients(fixed_s=0.012, prefill_s_per_token=4e-5, decode_s_per_token=3e-4)


def _mixed_steps(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """(P, D) of ``n`` steps as a busy replica runs them: mostly mixed, some of one kind."""
    out = []
    for _ in range(n):
        kind = rng.random()
        p = 0 if kind < 0.3 else rng.randint(16, 2048)
        d = 0 if 0.3 <= kind < 0.4 else rng.randint(1, 64)
        out.append((p, d))
    return out


def _feed(fit: StepTimeFit, steps: list[tuple[int, int]], model: StepCoefficients,
          rng: random.Random, noise: float = 0.0) -> None:
    for p, d in steps:
        fit.observe(p, d, model.step_time(p, d) * (1.0 + noise * rng.uniform(-1.0, 1.0)))


def test_recovers_known_coefficients_from_mixed_steps() -> None:
    rng = random.Random(0)
    fit = StepTimeFit(alpha=0.05)
    _feed(fit, _mixed_steps(rng, 400), TRUE, rng, noise=0.03)  # ±3% timing noise
    c = fit.coefficients()
    assert c.fixed_s == pytest.approx(TRUE.fixed_s, rel=0.1)
    assert c.prefill_s_per_token == pytest.approx(TRUE.prefill_s_per_token, rel=0.03)
    assert c.decode_s_per_token == pytest.approx(TRUE.decode_s_per_token, rel=0.1)
    exact = StepTimeFit(alpha=0.05)
    _feed(exact, _mixed_steps(rng, 400), TRUE, rng)
    e = exact.coefficients()
    for got, want in zip((e.fixed_s, e.prefill_s_per_token, e.decode_s_per_token),
                         (TRUE.fixed_s, TRUE.prefill_s_per_token, TRUE.decode_s_per_token),
                         strict=True):
        assert got == pytest.approx(want, rel=1e-2)  # only the ridge's pull (to 0) remains


def test_steps_of_one_kind_keep_the_other_kinds_coefficient() -> None:
    rng = random.Random(1)
    fit = StepTimeFit(alpha=0.1)
    _feed(fit, _mixed_steps(rng, 200), TRUE, rng)
    before = fit.coefficients()
    # a long decode-only stretch whose steps got 2x dearer: c_p is not in these steps
    slow = StepCoefficients(2 * TRUE.fixed_s, TRUE.prefill_s_per_token, 2 * TRUE.decode_s_per_token)
    _feed(fit, [(0, rng.randint(1, 64)) for _ in range(1000)], slow, rng)
    after = fit.coefficients()
    assert after.prefill_s_per_token == pytest.approx(before.prefill_s_per_token, rel=0.02)
    assert after.fixed_s == pytest.approx(slow.fixed_s, rel=0.02)
    assert after.decode_s_per_token == pytest.approx(slow.decode_s_per_token, rel=0.02)
    # then a prefill-only burst: c_d stays what the decode steps said
    _feed(fit, [(rng.randint(64, 4096), 0) for _ in range(1000)], slow, rng)
    last = fit.coefficients()
    assert last.decode_s_per_token == pytest.approx(slow.decode_s_per_token, rel=0.02)
    assert last.prefill_s_per_token == pytest.approx(slow.prefill_s_per_token, rel=0.02)


def test_a_macro_step_counts_as_its_k_steps() -> None:
    rng = random.Random(2)
    steps = _mixed_steps(rng, 100)
    one, many = StepTimeFit(alpha=0.1), StepTimeFit(alpha=0.1)
    _feed(one, steps, TRUE, rng)
    _feed(many, steps, TRUE, rng)
    for _ in range(8):
        one.observe(0, 16, TRUE.step_time(0, 16))
    many.observe(0, 16 * 8, 8 * TRUE.step_time(0, 16), num_steps=8)
    a, b = one.coefficients(), many.coefficients()
    assert one.num_steps == many.num_steps == 108
    assert b.fixed_s == pytest.approx(a.fixed_s, rel=1e-9)
    assert b.decode_s_per_token == pytest.approx(a.decode_s_per_token, rel=1e-9)
    assert b.prefill_s_per_token == pytest.approx(a.prefill_s_per_token, rel=1e-9)


def test_coefficients_stay_non_negative() -> None:
    # times that fall with the prompt's size: least squares would give c_p < 0
    fit = StepTimeFit(alpha=0.2)
    for p in (100, 200, 400, 800) * 10:
        fit.observe(p, 4, 0.05 - p * 1e-5)
    c = fit.coefficients()
    assert min(c.fixed_s, c.prefill_s_per_token, c.decode_s_per_token) >= 0.0
    assert c.prefill_s_per_token == 0.0 and c.fixed_s > 0.0


def test_a_replica_that_slows_down_moves_its_fit_within_30_steps() -> None:
    rng = random.Random(3)
    fit = StepTimeFit(alpha=0.1)
    _feed(fit, _mixed_steps(rng, 100), TRUE, rng)
    fast = fit.coefficients().step_time(512, 16)
    slow = StepCoefficients(3 * TRUE.fixed_s, 3 * TRUE.prefill_s_per_token,
                            3 * TRUE.decode_s_per_token)
    _feed(fit, _mixed_steps(rng, 30), slow, rng)
    assert fit.coefficients().step_time(512, 16) > 2.5 * fast
    _feed(fit, _mixed_steps(rng, 30), TRUE, rng)  # and recovers
    assert fit.coefficients().step_time(512, 16) < 1.3 * fast


def test_ignored_steps_and_bad_settings() -> None:
    fit = StepTimeFit(alpha=0.1)
    fit.observe(0, 0, 1.0)
    fit.observe(5, 0, 0.0)
    fit.observe(5, 0, 1.0, num_steps=0)
    assert fit.num_steps == 0 and fit.coefficients() == StepCoefficients()
    with pytest.raises(ValueError, match="alpha"):
        StepTimeFit(alpha=0.0)
    with pytest.raises(ValueError, match="ridge"):
        StepTimeFit(alpha=0.1, ridge=0.0)
