"""StepTimeFit: an online least-squares fit of a replica's step time to its work.

One engine step computes ``P`` prompt tokens and ``D`` decode rows in ``T`` seconds. The fit is

    T ≈ fixed_s + prefill_s_per_token · P + decode_s_per_token · D        θ = (fixed, c_p, c_d)

over the recent steps: exponentially weighted normal equations (weight (1−α)^age per step)

    A ← (1−α)·A + α·x·xᵀ      b ← (1−α)·b + α·x·T      x = (1, P, D)

(step t of the first 1/α weighs 1/t instead of α: a plain mean until the EWMA takes over)

solved on demand as a ridge problem pulled towards the previous solution θ₀, with every
coefficient kept >= 0 (the best non-negative solution among the 8 sets of free coefficients):

    minimise  Σ_age (1−α)^age (xᵀθ − T)²  +  λ·‖S⁻¹(θ − θ₀)‖²,   S = diag(1, 1/P̄, 1/D̄)

NOTE: why the pull towards θ₀. Steps of one kind only (a decode-only stretch, a prefill-only
burst) carry no information on the other kind's coefficient; plain least squares (or
recursive least squares with forgetting) then lets that coefficient drift or blow up as its
information decays. With the pull, a direction the recent steps do not excite keeps its last
estimate, and a direction they do excite follows the data (λ = 1e-3 is small against the
per-step weight of an excited direction, which is ~1 in the scaled coordinates: P̄ and D̄ are
the recent mean prompt tokens per prefill step and decode rows per decode step).

``observe(P, D, T, num_steps=k)`` folds in k identical steps that took T in all (a decode-only
macro step of the simulator, or several steps timed together): the same as k calls with T/k.

Contract: one writer thread (``observe``). ``coefficients()`` solves at most once per change
and may run on another thread: it reads the sums without a lock (a step folded in meanwhile
may be half-seen; the next call solves again).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# NOTE: the ridge weight in scaled coordinates (module docstring).
RIDGE = 1e-3


@dataclass(slots=True, frozen=True)
class StepCoefficients:
    """The fitted step-time model, in seconds (all >= 0; 0.0 everywhere before any step)."""

    fixed_s: float = 0.0
    prefill_s_per_token: float = 0.0
    decode_s_per_token: float = 0.0

    def step_time(self, num_prefill_tokens: float, num_decode_tokens: float) -> float:
        """Predicted seconds of one step with this work."""
        return (self.fixed_s + self.prefill_s_per_token * num_prefill_tokens
                + self.decode_s_per_token * num_decode_tokens)


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting on a small dense system (None: singular)."""
    n = len(v)
    a = [[*row, v[i]] for i, row in enumerate(m)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-300:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            if f:
                for c in range(col, n + 1):
                    a[r][c] -= f * a[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


class StepTimeFit:
    """Online non-negative ridge least squares of step time on (1, P, D) (module docstring)."""

    def __init__(self, alpha: float, ridge: float = RIDGE) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if ridge <= 0.0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.alpha = alpha
        self.ridge = ridge
        self._a = [[0.0] * 3 for _ in range(3)]  # EWMA of x·xᵀ (raw units)
        self._b = [0.0] * 3  # EWMA of x·T
        self.mean_prefill_tokens = 0.0  # P̄: per step with prompt work
        self.mean_decode_tokens = 0.0  # D̄: per step with decode work
        self._num_p = self._num_d = 0  # steps with prompt / decode work so far
        self._theta = StepCoefficients()
        self._version = self._solved = 0  # NOTE: bumped per observe; a counter, not a flag,
        self.num_steps = 0  # so a step folded in during a solve on another thread is not lost

    def observe(
        self, num_prefill_tokens: int, num_decode_tokens: int, seconds: float, num_steps: int = 1
    ) -> None:
        """Fold in ``num_steps`` identical steps that did this work in ``seconds`` in all; a
        step with no work or no measurable time is ignored."""
        if seconds <= 0.0 or num_steps <= 0 or num_prefill_tokens + num_decode_tokens <= 0:
            return
        k = num_steps
        x = (1.0, num_prefill_tokens / k, num_decode_tokens / k)
        t = seconds / k
        old = self._keep(k)
        new = 1.0 - old
        self.num_steps += k
        for i in range(3):
            row = self._a[i]
            for j in range(3):
                row[j] = old * row[j] + new * x[i] * x[j]
            self._b[i] = old * self._b[i] + new * x[i] * t
        if x[1] > 0:
            self._num_p, w = self._num_p + k, 1.0 - self._keep(k, self._num_p)
            self.mean_prefill_tokens += w * (x[1] - self.mean_prefill_tokens)
        if x[2] > 0:
            self._num_d, w = self._num_d + k, 1.0 - self._keep(k, self._num_d)
            self.mean_decode_tokens += w * (x[2] - self.mean_decode_tokens)
        self._version += 1

    def _keep(self, k: int, seen: int | None = None) -> float:
        """Weight left on the old sums after ``k`` more steps, ``seen`` steps in so far.

        NOTE: warm-up: step t weighs max(α, 1/t), so the first 1/α steps (the start-up probe
        among them) count equally, as in a plain mean, and none of them is drowned by an EWMA
        started at zero or by the first sample alone."""
        n = self.num_steps if seen is None else seen
        keep = 1.0
        for t in range(n + 1, n + k + 1):
            if 1.0 / t <= self.alpha:  # past the warm-up: the rest decays at (1 - α) per step
                return keep * (1.0 - self.alpha) ** (n + k + 1 - t)
            keep *= 1.0 - 1.0 / t
        return keep

    def coefficients(self) -> StepCoefficients:
        """The current fit (solved now if steps arrived since the last call)."""
        version = self._version
        if version != self._solved:
            self._theta = self._fit()
            self._solved = version
        return self._theta

    def _fit(self) -> StepCoefficients:
        # scaled coordinates: x' = S·x, θ' = S⁻¹·θ (S = diag(1, 1/P̄, 1/D̄)), so every excited
        # direction carries ~1 per step of weight and one λ fits all three.
        s = (1.0, 1.0 / max(self.mean_prefill_tokens, 1.0), 1.0 / max(self.mean_decode_tokens, 1.0))
        prev = self._theta
        p = (prev.fixed_s, prev.prefill_s_per_token / s[1], prev.decode_s_per_token / s[2])
        lam = self.ridge
        m = [[s[i] * self._a[i][j] * s[j] + (lam if i == j else 0.0) for j in range(3)]
             for i in range(3)]
        v = [s[i] * self._b[i] + lam * p[i] for i in range(3)]
        best: list[float] | None = None
        best_cost = float("inf")
        for free in _FREE_SETS:
            sol = _solve([[m[i][j] for j in free] for i in free], [v[i] for i in free])
            if sol is None or (sol and min(sol) < 0.0):
                continue
            th = [0.0, 0.0, 0.0]
            for i, val in zip(free, sol, strict=True):
                th[i] = val
            # the quadratic's value up to a constant: θᵀMθ − 2θᵀv
            cost = sum(th[i] * m[i][j] * th[j] for i in range(3) for j in range(3))
            cost -= 2.0 * sum(th[i] * v[i] for i in range(3))
            if cost < best_cost:
                best, best_cost = th, cost
        assert best is not None  # the empty set (θ = 0) is always feasible
        return StepCoefficients(best[0], best[1] * s[1], best[2] * s[2])


# NOTE: every subset of coefficients left free (the others pinned at 0), largest first; the
# non-negative optimum of a convex quadratic is the best feasible unconstrained optimum of one.
_FREE_SETS: tuple[tuple[int, ...], ...] = tuple(
    c for r in (3, 2, 1, 0) for c in itertools.combinations(range(3), r)
)
