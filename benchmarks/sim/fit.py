"""Fit the step-time model's coefficients (``sim/calibration.py``) to measured engine steps.

The model is linear in its coefficients except for the GEMM roofline term::

    t = base + per_seq*S + max(weights_read, linear*T) + attn*P + kv_read*D
      = base + per_seq*S + linear*max(T0, T) + attn*P + kv_read*D,   T0 = weights_read / linear

So for a fixed knee ``T0`` (the token count where the GEMMs turn compute-bound) the fit is a
non-negative least squares problem in (base, per_seq, linear, attn, kv_read); the knee is
searched (a log grid, then a bounded scalar refinement). Rows are weighted by 1/t, so the fit
minimises RELATIVE error: a 2 ms decode step counts as much as a 2 s prefill.

No torch, no Ray, no scipy: numpy only (five unknowns: NNLS is solved exactly by trying every
support set; the GPU machine and CI run this too).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

COEFFS = ("base_s", "per_seq_s", "weights_read_s", "linear_per_token_s", "attn_per_pair_s",
          "kv_read_per_token_s")


@dataclass(frozen=True, slots=True)
class StepShape:
    """One engine step as the simulator sees it (``SimReplica._time``): tokens computed,
    sequences in the batch, causal attention pairs of the prefill chunks
    (Σ n·(ctx_before + n/2)) and the decode sequences' summed context (tokens before the new
    one)."""

    num_tokens: int
    num_seqs: int
    attn_pairs: float
    decode_ctx_tokens: int
    kind: str = ""  # "prefill", "decode" or "mixed" (for the residual report)


@dataclass(frozen=True, slots=True)
class FitResult:
    coeffs: dict[str, float]
    knee_tokens: float  # T0 = weights_read_s / linear_per_token_s
    rel_errors: list[float]  # (predicted - measured) / measured, per row
    rms_rel_error: float

    def predict(self, shape: StepShape) -> float:
        return predict(self.coeffs, shape)


def predict(coeffs: dict[str, float], s: StepShape) -> float:
    """The simulator's formula (``StepTimeModel.step_time``) on a coefficient dict."""
    gemm = max(coeffs["weights_read_s"], coeffs["linear_per_token_s"] * s.num_tokens)
    return (coeffs["base_s"] + coeffs["per_seq_s"] * s.num_seqs + gemm
            + coeffs["attn_per_pair_s"] * s.attn_pairs
            + coeffs["kv_read_per_token_s"] * s.decode_ctx_tokens)


def _design(shapes: Sequence[StepShape], knee: float) -> np.ndarray:
    return np.asarray([[1.0, s.num_seqs, max(knee, s.num_tokens), s.attn_pairs,
                        s.decode_ctx_tokens] for s in shapes], dtype=np.float64)


def nnls_small(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0, exact for a few columns: the optimum is the
    unconstrained least-squares solution on its own support, so the best feasible one over
    every support set is it (the problem is convex)."""
    n = a.shape[1]
    best, best_loss = np.zeros(n), float(b @ b)
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            sub = a[:, cols]
            x_s, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (x_s < 0).any():
                continue
            r = sub @ x_s - b
            loss = float(r @ r)
            if loss < best_loss:
                best = np.zeros(n)
                best[list(cols)] = x_s
                best_loss = loss
    return best


def _solve(shapes: Sequence[StepShape], times: np.ndarray, knee: float
           ) -> tuple[np.ndarray, float]:
    """NNLS at a fixed knee on columns scaled to unit norm (the features span ~10 decades)."""
    a = _design(shapes, knee) / times[:, None]
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    x = nnls_small(a / norms, np.ones(len(times))) / norms
    resid = a @ x - 1.0
    return x, float(resid @ resid)


def _golden(fn: Callable[[float], float], a: float, b: float, iters: int = 60
            ) -> tuple[float, float]:
    """Minimum of a unimodal fn on [a, b] by golden-section search: (x, fn(x))."""
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = fn(d)
    return (c, fc) if fc < fd else (d, fd)


def fit_step_times(shapes: Sequence[StepShape], times: Sequence[float],
                   fit_knee: bool = True) -> FitResult:
    """Least-relative-error non-negative fit of the step-time coefficients.

    ``fit_knee`` False fixes weights_read_s = 0 (a purely linear GEMM term). Raises ValueError
    when there are fewer rows than unknowns or a time is not positive.
    """
    t = np.asarray(times, dtype=np.float64)
    if len(shapes) != len(t):
        raise ValueError(f"{len(shapes)} shapes but {len(t)} times")
    if len(t) < 6:
        raise ValueError(f"need at least 6 measured steps to fit 6 coefficients, got {len(t)}")
    if (t <= 0).any():
        raise ValueError("step times must be positive")
    tokens = np.asarray([s.num_tokens for s in shapes], dtype=np.float64)
    knee = 0.0
    if fit_knee:
        lo, hi = 1.0, float(tokens.max())
        grid = np.unique(np.concatenate([[0.0], np.geomspace(lo, hi, 96), tokens]))
        losses = [_solve(shapes, t, k)[1] for k in grid]
        i = int(np.argmin(losses))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        knee = float(grid[i])
        if b > a:
            k_best, loss = _golden(lambda k: _solve(shapes, t, k)[1], float(a), float(b))
            if loss < losses[i]:
                knee = k_best
    x, _ = _solve(shapes, t, knee)
    base, per_seq, linear, attn, kv = (float(v) for v in x)
    coeffs = {"base_s": base, "per_seq_s": per_seq, "weights_read_s": linear * knee,
              "linear_per_token_s": linear, "attn_per_pair_s": attn, "kv_read_per_token_s": kv}
    rel = [(predict(coeffs, s) - m) / m for s, m in zip(shapes, t.tolist(), strict=True)]
    return FitResult(coeffs, knee, rel, float(np.sqrt(np.mean(np.square(rel)))))


def residual_report(shapes: Sequence[StepShape], rel_errors: Sequence[float]
                    ) -> dict[str, dict[str, float]]:
    """Median / max |relative error| per step kind (and ``all``)."""
    out: dict[str, dict[str, float]] = {}
    kinds = [*sorted({s.kind for s in shapes}), "all"]
    for kind in kinds:
        errs = np.abs([e for s, e in zip(shapes, rel_errors, strict=True)
                       if kind == "all" or s.kind == kind])
        if len(errs):
            out[kind] = {"n": len(errs), "median_abs_rel_error": float(np.median(errs)),
                         "max_abs_rel_error": float(errs.max())}
    return out
