"""Arrival processes shared by every workload.

- ``poisson``: exponential inter-arrival times (the SGLang/vLLM bench default with a finite
  ``--request-rate``).
- ``gamma``: BurstGPT-like. BurstGPT (Wang et al., 2024, arXiv:2401.17644; 10.31M Azure OpenAI
  traces) models request inter-arrivals with a Gamma distribution; shape k < 1 is burstier than
  Poisson (coefficient of variation 1/sqrt(k)). Mean inter-arrival stays 1/rate for any k.
- ``staged``: piecewise-constant rates (a QPS sweep in one run, as llm-d's benchmark does).

All functions are pure given the ``numpy.random.Generator`` they are handed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ARRIVALS = ("poisson", "gamma")
# NOTE: 0.5 gives CV ~1.41; BurstGPT reports conversation/API services well above Poisson's CV 1.
DEFAULT_GAMMA_SHAPE = 0.5


def inter_arrivals(
    rng: np.random.Generator, n: int, rate: float, process: str = "poisson",
    gamma_shape: float = DEFAULT_GAMMA_SHAPE,
) -> np.ndarray:
    """``n`` inter-arrival gaps (seconds) with mean ``1/rate``; rate=inf gives all zeros."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if np.isinf(rate):
        return np.zeros(n)
    if process == "poisson":
        return rng.exponential(1.0 / rate, size=n)
    if process == "gamma":
        if gamma_shape <= 0:
            raise ValueError(f"gamma_shape must be positive, got {gamma_shape}")
        return rng.gamma(gamma_shape, 1.0 / (gamma_shape * rate), size=n)
    raise ValueError(f"unknown arrival process {process!r}; expected one of {ARRIVALS}")


def arrival_times(
    rng: np.random.Generator, n: int, rate: float, process: str = "poisson",
    gamma_shape: float = DEFAULT_GAMMA_SHAPE, start_s: float = 0.0,
) -> np.ndarray:
    """Cumulative arrival times of ``n`` events, the first at ``start_s``."""
    gaps = inter_arrivals(rng, n, rate, process, gamma_shape)
    if n == 0:
        return gaps
    gaps[0] = 0.0
    return start_s + np.cumsum(gaps)


def staged_arrival_times(
    rng: np.random.Generator, rates: Sequence[float], stage_s: float, process: str = "poisson",
    gamma_shape: float = DEFAULT_GAMMA_SHAPE,
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Arrivals for consecutive stages of ``stage_s`` seconds at each rate in ``rates``.
    Returns (times, stages) with stages as ``(start_s, end_s, rate)``."""
    times: list[np.ndarray] = []
    stages: list[tuple[float, float, float]] = []
    t0 = 0.0
    for rate in rates:
        n = max(1, round(rate * stage_s))
        gaps = inter_arrivals(rng, n, rate, process, gamma_shape)
        ts = t0 + np.cumsum(gaps)
        times.append(ts[ts < t0 + stage_s])
        stages.append((t0, t0 + stage_s, float(rate)))
        t0 += stage_s
    return np.concatenate(times) if times else np.zeros(0), stages


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    """Normalised Zipf popularity over ``n`` items (rank 1 most popular)."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()
