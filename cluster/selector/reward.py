"""R(c): what a replica's realised outcomes say that its reports do not (ARCHITECTURE.md, R).

When the service routes request i to replica c it records what the objective predicts for it
there from c's *reports* (``predict``): the cached tokens (c's resident prefix in the index)
and the request's own prefill time at c's reported rate,

    own_i = uncached_c(i) / rate_c            (the own-prefill part of objective.ttft_estimate)

When c reports the realised outcome (the Feedback path: replica completion -> selection
service), TTFT_i joins c's window. c's slowness is its realised TTFT over its predicted prefill
time, relative to the whole fleet's:

    k(c) = [ Σ γ^(i−1)·TTFT_i / Σ γ^(i−1)·own_i ]_c  /  m,     m = EWMA_fleet(TTFT) / EWMA_fleet(own)
    R(c) = −max(0, k(c) − 1 − ρ) · 2^(−age/half_life)           ρ = reward_tolerance

over c's n = ``reward_window`` latest outcomes that had a prediction (1[hit_i] of the formula:
outcomes of requests this service did not route carry none and do not count); age is the time
since c's newest counted outcome. R ≤ 0 and dimensionless; ``lambda_reward`` turns it into
score: a replica 2x slower than the fleet with the same reports, ρ = 0.5, scores
−0.5·lambda_reward.

Why this form (measured, simulated gsp at 32 replicas, a quarter at half speed reporting full
speed; NOTE in benchmarks/README.md): the queue part of the estimate (κ·queued/rate) overstates
a busy replica's wait ~10x (decode tokens owed count as prefill), so realised-vs-estimated TTFT
in seconds hid the slow replicas: their excess over the whole estimate was no larger than the
healthy ones'. Realised TTFT over the own-prefill prediction separates them (per 16-outcome
window: half-speed median 2.0x the fleet, 5th percentile 1.45x; healthy median 0.92x, 95th
percentile 1.61x). A slow replica's queue wait grows with its slowness too, so it counts in
TTFT_i; a replica only queued deeper than others also shows k > 1, but the Load term has
already charged that queue, which is why ρ leaves the first 50% to it. A missed predicted hit
(a lossy or lagging KV-event stream) shows up as well: the tokens the index said were cached
are recomputed, TTFT_i grows while own_i counted them as free. The cached-token shortfall
itself is kept per replica (``ReplicaReward.miss_ratio``).

Recovery: R fades with the age of c's newest outcome, and a penalised replica still gets work
when the others' queues cost more than its penalty; its next outcomes then show its speed.

R enters the score as a per-replica additive column (``ReplicaTable`` ``reward``, the compiled
kernel's ``floats[3]``), refreshed on each outcome and each load report of c.

Two options, off by default (benchmarks/results/reward_bound.md has the measurement):
``reward_rate_weight`` β > 0 also divides c's rate in the Load term by 1 − β·R (``rate_scale``),
so the slowness R found costs c seconds of estimated TTFT, as its queue grows, instead of a
fixed score; ``reward_fleet_median`` takes m as the median replica's ratio instead of the
fleet's EWMA ratio, which slow replicas with long queues can dominate (``fleet_scale``).

Contract: not thread-safe (the core serialises calls). Memory: one prediction per routed
request until its outcome arrives, bounded by ``max_pending`` (oldest dropped).
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from cluster.selector.objective import ObjectiveConfig
    from cluster.selector.types import Outcome


class Prediction(NamedTuple):
    """What the objective expected of one routed request on its replica: the cached tokens
    and the request's own prefill time (seconds) at the replica's reported rate."""

    replica_id: str
    num_cached_tokens: int
    own_s: float


def predict(
    replica_id: str,
    num_prompt_tokens: int,
    num_matched_tokens: int,
    prefill_tokens_per_s: float,
    cfg: ObjectiveConfig,
) -> Prediction:
    """The objective's expectation for a request routed to ``replica_id`` (module docstring);
    ``prefill_tokens_per_s`` <= 0 means not reported (the configured rate stands in)."""
    rate = prefill_tokens_per_s if prefill_tokens_per_s > 0 else cfg.prefill_tokens_per_s
    cached = min(max(num_matched_tokens, 0), num_prompt_tokens)
    return Prediction(replica_id, cached, (num_prompt_tokens - cached) / rate)


def rate_scale(reward: float, weight: float) -> float:
    """The factor R(c) puts on c's reported prefill rate in the Load term with
    ``reward_rate_weight`` β > 0: 1 / (1 − β·R), in (0, 1] (R ≤ 0; 1.0 at R = 0 or β = 0).

    NOTE: R = −(k − 1 − ρ) past the tolerance, so β = 1 divides the rate by 1 + (k − 1 − ρ):
    a replica k times slower than the fleet per reported second is seen slower, in seconds of
    estimated TTFT, instead of only losing score. The prediction R is measured against stays
    the REPORTED rate (core ``_expect``), so the correction does not cancel its own evidence.
    """
    return 1.0 / (1.0 - weight * min(reward, 0.0))


def corrected_rate(reported: float, reward: float, cfg: ObjectiveConfig) -> float:
    """The prefill rate the objective uses for a replica whose R is ``reward``: ``reported``
    as is (0.0 = none: the configured rate stands in downstream), unless
    ``reward_rate_weight`` > 0 and R < 0; then that rate (or the configured one) x
    ``rate_scale``."""
    if not cfg.reward_rate_weight or reward >= 0.0:
        return reported
    base = reported if reported > 0 else cfg.prefill_tokens_per_s
    return base * rate_scale(reward, cfg.reward_rate_weight)


def discounted_mean(values: Iterable[float], gamma: float) -> float:
    """Σ γ^(i−1)·v_i / Σ γ^(i−1) over ``values`` newest first (0.0 when empty)."""
    num = den = 0.0
    g = 1.0
    for v in values:
        num += g * v
        den += g
        g *= gamma
    return num / den if den else 0.0


def discounted_ratio(pairs: Iterable[tuple[float, float]], gamma: float) -> float:
    """Σ γ^(i−1)·a_i / Σ γ^(i−1)·b_i over (a_i, b_i) newest first (1.0 when Σb is 0)."""
    num = den = 0.0
    g = 1.0
    for a, b in pairs:
        num += g * a
        den += g * b
        g *= gamma
    return num / den if den > 0 else 1.0


@dataclass(slots=True)
class ReplicaReward:
    """One replica's recent (realised TTFT, predicted own prefill) pairs and cached-token
    misses, newest first, and when the newest arrived."""

    window: int
    outcomes: deque[tuple[float, float]] = field(init=False)
    ratio: float = 1.0  # NOTE: discounted_ratio(outcomes, γ), cached for the fleet median
    misses: deque[float] = field(init=False)
    last_t: float = 0.0

    def __post_init__(self) -> None:
        self.outcomes = deque(maxlen=self.window)
        self.misses = deque(maxlen=self.window)

    def slowness(self, gamma: float, m: float) -> float:
        """k(c): realised TTFT over predicted own prefill, relative to the fleet's ``m``."""
        # NOTE: m = 0 when the fleet reported no TTFT at all (0.0 = unknown): no evidence.
        return discounted_ratio(self.outcomes, gamma) / m if m > 0 else 1.0

    def value(self, now: float, m: float, cfg: ObjectiveConfig) -> float:
        """R(c) at ``now`` (≤ 0; 0 without history)."""
        if not self.outcomes:
            return 0.0
        excess = self.slowness(cfg.gamma, m) - 1.0 - cfg.reward_tolerance
        if excess <= 0.0:
            return 0.0
        age = max(now - self.last_t, 0.0)
        return -excess * math.exp2(-age / cfg.reward_half_life_s)

    def miss_ratio(self, gamma: float) -> float:
        """Discounted share of predicted cached tokens that were not cached."""
        return discounted_mean(self.misses, gamma)


class RewardBook:
    """Predictions of routed requests and every replica's R(c) (module docstring)."""

    # NOTE: the fleet calibration follows roughly the last 1/alpha outcomes of all replicas.
    FLEET_ALPHA = 0.01

    def __init__(self, cfg: ObjectiveConfig, max_pending: int = 65536) -> None:
        self.cfg = cfg
        self._pending: OrderedDict[str, Prediction] = OrderedDict()
        self._max_pending = max_pending
        self._replicas: dict[str, ReplicaReward] = {}
        self._real = self._pred = 0.0  # EWMAs of realised TTFT and predicted own (fleet)
        self._num_outcomes = 0
        self._median: float | None = None  # the fleet median, None = stale

    @property
    def fleet_scale(self) -> float:
        """m: realised TTFT per second of predicted own prefill, fleet-wide (1.0 before any):
        the ratio of the fleet's EWMAs, or with ``reward_fleet_median`` the median over
        replicas of their own windows' ratio.

        NOTE: why a median (measured, gsp at 32 replicas, a quarter at half speed, seed 0):
        the slow replicas' long queue waits dominate the fleet's sums (m = 8.2 s per predicted
        second), so they sat at k = 1.0-1.4 of it and the healthy ones at 0.3-0.45: R never
        passed the tolerance. The median is a healthy replica's ratio while most are healthy.
        """
        if not self.cfg.reward_fleet_median:
            return self._real / self._pred if self._pred > 0 else 1.0
        if self._median is None:
            ratios = [r.ratio for r in self._replicas.values() if r.outcomes]
            self._median = statistics.median(ratios) if ratios else 1.0
        return self._median

    def _calibrate(self, ttft_s: float, pred_s: float) -> None:
        # NOTE: a plain mean over the first 1/alpha outcomes, then the EWMA (no start-up bias
        # towards whichever replica answered first).
        self._num_outcomes += 1
        a = max(self.FLEET_ALPHA, 1.0 / self._num_outcomes)
        self._real += a * (ttft_s - self._real)
        self._pred += a * (pred_s - self._pred)

    def expect(self, request_id: str, pred: Prediction) -> None:
        """Remember ``pred`` until the request's outcome arrives."""
        self._pending[request_id] = pred
        if len(self._pending) > self._max_pending:
            self._pending.popitem(last=False)

    def observe(self, outcome: Outcome, now: float) -> float | None:
        """Fold a realised outcome in; returns the replica's new R, or None when the request
        had no prediction (or was predicted for another replica): R unchanged."""
        pred = self._pending.pop(outcome.request_id, None)
        if pred is None or pred.replica_id != outcome.replica_id:
            return None
        rec = self._replicas.get(outcome.replica_id)
        if rec is None:
            rec = self._replicas[outcome.replica_id] = ReplicaReward(self.cfg.reward_window)
        ttft = max(outcome.ttft_s, 0.0)
        self._calibrate(ttft, pred.own_s)
        rec.outcomes.appendleft((ttft, pred.own_s))
        rec.ratio = discounted_ratio(rec.outcomes, self.cfg.gamma)
        self._median = None
        missed = max(pred.num_cached_tokens - outcome.num_cached_tokens, 0)
        rec.misses.appendleft(missed / pred.num_cached_tokens if pred.num_cached_tokens else 0.0)
        rec.last_t = now
        return self.value(outcome.replica_id, now)

    def value(self, replica_id: str, now: float) -> float:
        """R(replica) at ``now`` (0.0 for a replica without counted outcomes)."""
        rec = self._replicas.get(replica_id)
        return rec.value(now, self.fleet_scale, self.cfg) if rec is not None else 0.0

    def replica(self, replica_id: str) -> ReplicaReward | None:
        return self._replicas.get(replica_id)

    def forget(self, replica_id: str) -> None:
        """Drop a departed replica's history (its pending predictions expire unanswered)."""
        self._replicas.pop(replica_id, None)
