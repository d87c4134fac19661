"""The TinyServe selection objective (ARCHITECTURE.md, "The selection objective").

    score(c|q) = λ1·U(c|q) − λ2·C(c,q) + λ3·R(c)
    U(c|q)     = softmax_c( wᵀφ(q,c) / T ) / max_c softmax_c(...)   (best candidate: U = 1)
    φ(q,c)     = [ Q(q)·S(q,c), S(q,c)·A(c,q), S(q,c), S(q,c)·L(c,q) ]
    C(c,q)     = α1·Size + α2·Load + α3·Latency + α4·F_total
    R(c)       = −max(0, k(c) − 1 − ρ)·2^(−age/half_life)      k(c): c's realised TTFT per
                 predicted own-prefill second over its n latest outcomes (γ-discounted),
                 relative to the fleet's (cluster/selector/reward.py)

Feature definitions (all in [0, 1]; n_q = prompt blocks, m_c = matched resident blocks,
p_c = extra blocks matched only through pending speculative inserts, h_c = matched blocks on
the host tier only):

- S (similarity) = (m_c − (1−host_weight)·h_c + pending_weight·p_c) / n_q: tier-weighted
  longest-prefix fraction.
- A (frequency)  = 1 − exp(−hotness_c / hot_scale); hotness = decayed count of requests routed
  to c through the same prefix checkpoint (see core.AccessTracker).
- L (locality)   = tier share of the matched KV ((m_c − (1−host_weight)·h_c) / m_c, 0 without a
  match), halved when the caller named its node and c runs on another node.
- NOTE: A and L describe the matched KV (how hot, which tier), so they enter φ scaled by S
  (``match_scaled_features``): what they say is worth as much as the share of q that the
  match covers. Unscaled, a 3-block chat-template opening that every request shares was worth
  a full device-resident, hot match (Δlogit up to 2, ΔU 0.87, i.e. 0.29 s of estimated TTFT
  at alpha_load 3) to the replica that happened to hold it, and requests with nothing else
  cached piled onto it: gpu_ab's b2b_saas imbalance 1.3-1.5 on one H100, 1.59 simulated,
  1.07 scaled (benchmarks/results/gpu_ab/README.md, "b2b_saas imbalance").
- Q (complexity) = 1 − exp(−num_prompt_tokens / q_scale_tokens). NOTE: Q(q) is the same for every
  candidate, so as a bare softmax input it would cancel. It acts through interaction: φ₀ = Q·S,
  i.e. a cache hit is worth more for a long (prefill-heavy) prompt than for a short one.
- NOTE: U is divided by its largest value, so the best-matching candidate has U = 1 and the
  others exp(−Δlogit) whatever the cluster size. A plain softmax shrinks like 1/N and would let
  the costs drown it at 256 replicas; the earlier N·softmax grew the winner's U like N (8 at 8
  replicas, 128 at 128), so at scale no queue depth could outweigh a cached prefix.

Costs: Size = blocks q still needs on c (uncached prompt + expected output) / c's free blocks,
clipped to [0, 2]; Latency = TTFT EWMA / latency_ref_s, clipped to [0, 4]; F_total = the pool's
fragmentation score, [0, 4]; and Load, the estimated-TTFT trade-off, in seconds:

    TTFT_est(c) = ( κ·queued_c + uncached_c(q) ) / rate_c
    Load(c)     = TTFT_est(c) − min_c' TTFT_est(c')                  clipped to [0, 60] s

With ``evict_token_weight`` ε > 0 the estimate also charges displaced KV, in seconds:
ε·evicted_c(q)/rate_c, evicted = the blocks q needs beyond c's empty ones (free
minus cached) in tokens: a context moved onto a full replica evicts others that their next
requests must recompute (B2B at 73% KV demand).

queued_c = c's reported tokens still to compute plus tokens routed to it since its last report
(queue wait); κ = ``queued_token_weight``, the prefill-equivalent share of a queued token
(NOTE: replicas report decode outputs owed and prompts in one number, and a decode token, one
row in a batched step, costs far less time than a prefill token); uncached_c(q) = q's prompt tokens not covered on c (its own prefill; covered as in
S: host blocks and pending inserts count with their weights). NOTE: this is the true trade-off
of cache-aware routing: a hit saves its recompute time, a deep queue costs its wait, both in
seconds. The best estimate costs 0, so Load is relative to the candidate set (like llm-d's
min-max scorers) but in absolute seconds: alpha_load (1/s) says how many seconds of estimated
TTFT one unit of utility (a full match versus none) is worth. The utility is the affinity bonus
on top (it keeps a prefix's requests together, so later ones hit, and hot prefixes are not
copied everywhere); Size, Latency and F_total are tie-breakers. The earlier Load (queued tokens
/ pool capacity, 403k tokens on an H100) was too small next to U to stop hot-prefix pile-ups
(benchmarks/results/tail_breakdown.md).

Online learning (``learn=True``): after each Feedback, w += lr·(r − r̄)·(φ_chosen − E_p[φ]), the
softmax policy-gradient step with a running-mean baseline r̄, r = realised cached-token ratio;
w is kept in [0, w_max]. The selection itself stays greedy (argmax of the score), so this is
the usual greedy approximation of REINFORCE.

rate_c is c's own prefill rate as it measured and reported it (``LoadSnapshot.
prefill_tokens_per_s``, replicas/rate_meter.py). NOTE: a constant rate was 100x off on the CPU
app (SmolLM2: ~250 tokens/s against the H100 default 30000), so the Load term vanished and
every request followed the shared chat-template prefix to one replica (issue 20). The
configured ``prefill_tokens_per_s`` only stands in for a replica that has reported no rate
(a vLLM engine seen through its KV events, or before its first snapshot).

Defaults: the simulator sweep's choice (see ``ObjectiveConfig``); all overridable per
deployment (``deploy/app.yaml`` selector.objective, the service CLI's ``--objective``;
``cluster/selector/objective_settings.py`` validates them).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from cluster.selector import objective_kernel as kernel
from cluster.selector.objective_settings import check_objective
from cluster.selector.policy import Policy, rank_by, register_policy
from cluster.selector.replica_table import _FLOAT_COLS, _INT_COLS
from cluster.selector.types import Candidates, FloatArray, Outcome, Ranking, SelectionRequest

FEATURES = ("complexity", "frequency", "similarity", "locality")


@dataclass(slots=True, frozen=True)
class ObjectiveConfig:
    """Weights of the objective. λ: utility/cost/reward; α: cost parts; w: feature weights
    (order of ``FEATURES``); γ and n: reward discount and window.

    NOTE: ``alpha_load`` (1/s) and ``queued_token_weight`` are the simulator sweep's choice for
    the estimated-TTFT Load (``python -m benchmarks.sweep_weights --workloads
    generated_shared_prefix multi_turn_chat tool_agent --seeds 0 1 2``, results in
    benchmarks/results/sweep.md): the best measured configuration, 0.91x the centre's
    (alpha_load 10) geomean TTFT p99 with 2.2 points more hits; a cached prefix is worth up to
    1/alpha_load = 0.33 s of estimated TTFT. ``alpha_size`` 0, ``w`` and ``lambda_reward`` 0
    come from the earlier sweep (commit 3cb2cec); w = 0 (pure estimated-TTFT routing) measured
    1.18x worse with 10 points fewer hits, so the utility term stays. ``lambda_reward`` 0.5 and
    ``reward_tolerance`` 0.5 (R(c), cluster/selector/reward.py: a replica slower than its reports) are
    the issue-20 measurement's choice (benchmarks/results/reward_scenarios.md): simulated
    multi_turn_chat at 32 replicas with a quarter at half speed, p99 0.109 s (R off) -> 0.087 s
    (0.5); 1 and 2 measured 0.093 s and 0.105 s in an ad-hoc run (R moves more traffic off the
    slow replicas and the rest queue deeper). ``evict_token_weight`` 2 is the choice of a sweep over
    all 8 workloads x 3 seeds at 8 replicas against the best baseline per (workload, seed)
    (benchmarks/results/sweep_evict.md): B2B TTFT p99 1.31x -> 1.06x the best baseline with
    the hit gap 3.8 -> 1.2 points, no other workload more than 0.02 worse; alpha_load 1, 5
    and 10 and queued_token_weight 0.5 all measured worse. ``alpha_fragmentation`` 0.1: under
    KV pressure (benchmarks/results/frag_weight.md) it moves TTFT p99 by <= 1.1% and hits by
    < 0.5 points against 0 (it does not matter); 1 costs 2.3-2.6 hit points.
    ``reward_rate_weight`` 0 and ``reward_fleet_median`` False (off; cluster/selector/reward.py)
    by benchmarks/results/reward_bound.md: rate weight 2 took multi_turn_chat `hetero` from
    0.87x to 0.76x the best baseline (seed 0; 0.85x on seed 1) but cost gsp `lossy_events`
    +3.4% and the fault-free gsp at 8 replicas +3.1%; the median norm reached 0.82x there and
    cost multi_turn_chat `slowdown` +6% on seed 1 and tool_agent (32 replicas) +2.1%.
    ``match_scaled_features`` True (A and L times S; False is the objective before it): with
    the real app's 3 shared template blocks in front of every prompt, simulated gpu_ab plan,
    2 replicas, seeds 0-4 (benchmarks/results/gpu_ab/sim_b2b_imbalance.md), imbalance
    b2b_saas 1.59 -> 1.07, tool_agent 1.29 -> 1.09, gsp 1.55 -> 1.05, multi_turn_chat 2.00 ->
    1.55, with TTFT p99 and hit ratio no worse on any of the four. The sweeps above ran
    without that header, so they never saw the herding. Without it (8 workloads at 8 replicas)
    it is neutral or better (tool_agent p99 0.441 -> 0.372 s; routing8_match_scaled_*)."""

    lambda_utility: float = 1.0
    lambda_cost: float = 1.0
    lambda_reward: float = 0.5
    alpha_size: float = 0.0
    alpha_load: float = 3.0
    alpha_latency: float = 0.25
    alpha_fragmentation: float = 0.1
    w: tuple[float, float, float, float] = (2.0, 1.0, 4.0, 1.0)
    temperature: float = 1.0
    gamma: float = 0.9
    reward_window: int = 16
    reward_tolerance: float = 0.5
    reward_half_life_s: float = 10.0
    reward_rate_weight: float = 0.0
    reward_fleet_median: bool = False
    q_scale_tokens: float = 2048.0
    hot_scale: float = 4.0
    host_weight: float = 0.5
    pending_weight: float = 0.8
    latency_ref_s: float = 1.0
    prefill_tokens_per_s: float = 30000.0
    queued_token_weight: float = 1.0
    evict_token_weight: float = 2.0
    load_clip_s: float = 60.0
    match_scaled_features: bool = True
    learn: bool = False
    learning_rate: float = 0.05
    w_max: float = 10.0

    def __post_init__(self) -> None:
        check_objective(self)  # NOTE: a bad weight fails at construction, naming the field


def _clip(x: FloatArray, lo: float, hi: float) -> FloatArray:  # used by the learner
    # NOTE: np.clip's Python wrapper costs ~5 us per call; the two ufuncs cost ~1 us.
    return np.minimum(np.maximum(x, lo), hi)


@dataclass(slots=True)
class _Trace:
    chosen: FloatArray
    expected: FloatArray


def _request_row(request: SelectionRequest) -> FloatArray:
    """The request's columns the compiled kernel reads (``objective_kernel``'s ``req``)."""
    return np.asarray(
        (
            request.num_prompt_blocks,
            request.num_prompt_tokens,
            request.num_output_tokens,
            1.0 if request.origin_node_id else 0.0,
        ),
        np.float64,
    )


@register_policy
class TinyServeObjective(Policy):
    """λ1·U − λ2·C + λ3·R over the candidates (see the module docstring)."""

    name = "tinyserve"

    def __init__(self, config: ObjectiveConfig | None = None, max_traces: int = 65536) -> None:
        self.config = config or ObjectiveConfig()
        self.w = np.asarray(self.config.w, dtype=np.float64)
        self._packed: FloatArray | None = None
        self._packed_w: FloatArray | None = None
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._max_traces = max_traces
        self._baseline = 0.0
        self._num_updates = 0

    def features(self, request: SelectionRequest, c: Candidates) -> dict[str, FloatArray]:
        """φ(q, c) as columns named like ``FEATURES`` (each of length N)."""
        cfg = self.config
        matched = c.num_matched_blocks
        tiered = (
            matched - (1.0 - cfg.host_weight) * c.num_host_blocks
            if c.num_host_blocks.any()
            else matched
        )
        covered = (
            tiered + cfg.pending_weight * c.num_pending_blocks
            if c.num_pending_blocks.any()
            else tiered
        )
        sim = np.minimum(covered * (1.0 / max(request.num_prompt_blocks, 1)), 1.0)
        hot = c.hotness
        freq = -np.expm1(hot * (-1.0 / cfg.hot_scale)) if hot.any() else np.zeros(len(hot))
        # NOTE: tiered == 0 wherever matched == 0, so no np.where is needed for "no match -> 0".
        loc = tiered / np.maximum(matched, 1)
        if request.origin_node_id:
            loc = loc * np.where(c.same_node, 1.0, 0.5)
        if cfg.match_scaled_features:
            freq = freq * sim
            loc = loc * sim
        q = 1.0 - math.exp(-request.num_prompt_tokens / cfg.q_scale_tokens)
        return {"complexity": q * sim, "frequency": freq, "similarity": sim, "locality": loc}

    def prefill_rates(self, c: Candidates) -> FloatArray:
        """Each candidate's prefill rate (tokens/s): its measured, reported one, or the
        configured ``prefill_tokens_per_s`` where it has reported none (0)."""
        reported = c.prefill_tokens_per_s
        rates: FloatArray = np.where(reported > 0, reported, self.config.prefill_tokens_per_s)
        return rates

    def ttft_estimate(self, request: SelectionRequest, c: Candidates) -> FloatArray:
        """Estimated TTFT (seconds) of ``request`` on each candidate: (κ·queued tokens + its
        own uncached prompt tokens) / c's prefill rate, κ = queued_token_weight."""
        cfg = self.config
        covered = c.num_matched_blocks - (1.0 - cfg.host_weight) * c.num_host_blocks
        covered = covered + cfg.pending_weight * c.num_pending_blocks
        uncached = np.maximum(request.num_prompt_tokens - covered * c.block_size, 0.0)
        queued = np.maximum(c.num_queued_tokens, 0) * cfg.queued_token_weight
        est: FloatArray = (queued + uncached) * (1.0 / self.prefill_rates(c))
        return est

    def costs(self, request: SelectionRequest, c: Candidates) -> dict[str, FloatArray]:
        """The four cost parts (each of length N)."""
        cfg = self.config
        need = np.maximum(
            request.num_prompt_blocks - c.num_matched_blocks - c.num_pending_blocks, 0
        )
        if request.num_output_tokens:
            need = need - (-request.num_output_tokens // np.maximum(c.block_size, 1))
        known = c.num_blocks > 0
        size = np.where(known, np.minimum(need / np.maximum(c.num_free_blocks, 1), 2.0), 0.0)
        load = self.ttft_estimate(request, c)
        if cfg.evict_token_weight:
            # NOTE: free blocks include evictable cached ones; free - cached is a lower bound
            # on the empty ones, so this never misses an eviction (it may see too many).
            empty = np.maximum(c.num_free_blocks - c.num_cached_blocks, 0)
            evicted = np.where(known, np.maximum(need - empty, 0), 0) * c.block_size
            load = load + evicted * (cfg.evict_token_weight / self.prefill_rates(c))
        if len(load):
            load = np.minimum(load - load.min(), cfg.load_clip_s)
        latency = np.minimum(c.ttft_ewma_s * (1.0 / cfg.latency_ref_s), 4.0)
        frag = np.minimum(c.f_total, 4.0)
        return {
            "size_cost": size,
            "load_cost": load,
            "latency_cost": latency,
            "fragmentation_cost": frag,
        }

    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        """Scores and terms of every candidate (``select_reference`` is the same in numpy)."""
        cfg = self.config
        c = candidates
        n = len(c)
        # NOTE: the kernel reads the candidates' columns as the replica table lays them out
        # (candidate j at slot j); np.array over a list is one C call, np.stack ~20.
        matched = np.asarray(c.num_matched_blocks, np.int64)
        tab_ints = np.array([getattr(c, name) for name in _INT_COLS], np.int64)
        tab_floats = np.array([getattr(c, name) for name in _FLOAT_COLS], np.float64)
        req = _request_row(request)
        q = kernel.complexity(request.num_prompt_tokens, cfg.q_scale_tokens)
        out = np.empty((len(kernel.OUT_ROWS), n), np.float64)
        kernel.score(np.arange(n), matched, matched + c.num_pending_blocks,
                     np.asarray(c.num_host_blocks, np.int64), np.asarray(c.hotness, np.float64),
                     np.asarray(c.same_node, np.float64), tab_ints, tab_floats,
                     self.packed_config(), req, q, out)  # fmt: skip
        terms = dict(zip(kernel.OUT_ROWS, out, strict=True))
        scores = terms.pop("score")
        terms["reward"] = c.reward
        ranking = rank_by(self.name, scores, terms)
        if cfg.learn and n and request.request_id:
            mat = out[6:10].T  # NOTE: OUT_ROWS 6..9 are FEATURES, in order
            utility = out[0]
            self._remember(
                request.request_id, mat[int(ranking.order[0])].copy(), (utility / utility.sum()) @ mat
            )
        return ranking

    def kernel_inputs(self, request: SelectionRequest) -> tuple[FloatArray, FloatArray, float]:
        """(cfg, req, q): the scalars the compiled kernels take for ``request`` (the core's
        fast path, ``select_kernel.rank``). Same numbers as ``select``; not for ``learn=True``
        (no trace is kept)."""
        req = _request_row(request)
        q = kernel.complexity(request.num_prompt_tokens, self.config.q_scale_tokens)
        return self.packed_config(), req, q

    def kernel_scalars(self, request: SelectionRequest) -> tuple[FloatArray, float]:
        """(cfg, q) of ``kernel_inputs`` without the request row (``select_kernel.select_bound``
        builds it from the request's counts)."""
        return self.packed_config(), kernel.complexity(
            request.num_prompt_tokens, self.config.q_scale_tokens
        )

    def packed_config(self) -> FloatArray:
        """The objective's scalars as the kernels take them (``objective_kernel.pack_config``).
        Rebuilt only when w changes (online learning replaces the array)."""
        if self._packed is None or self._packed_w is not self.w:
            self._packed, self._packed_w = kernel.pack_config(self.config, self.w), self.w
        return self._packed

    def select_reference(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        """The objective in numpy, term by term: the definition ``select`` computes in one
        compiled pass (``objective_kernel``); tests check both agree. No learning trace."""
        cfg = self.config
        n = len(candidates)
        phi = self.features(request, candidates)
        w0, w1, w2, w3 = (float(x) for x in self.w)
        q = 1.0 - math.exp(-request.num_prompt_tokens / cfg.q_scale_tokens)
        inv_t = 1.0 / cfg.temperature
        # NOTE: w0·(Q·S) + w2·S folded into one scaled column (fewer numpy calls per Select).
        logits = phi["similarity"] * ((w0 * q + w2) * inv_t)
        if w1:
            logits = logits + phi["frequency"] * (w1 * inv_t)
        if w3:
            logits = logits + phi["locality"] * (w3 * inv_t)
        # NOTE: softmax / max softmax == exp(logit − max logit): the best candidate has U = 1.
        utility = np.exp(logits - logits.max()) if n else logits
        parts = self.costs(request, candidates)
        cost = (
            cfg.alpha_size * parts["size_cost"]
            + cfg.alpha_load * parts["load_cost"]
            + cfg.alpha_latency * parts["latency_cost"]
            + cfg.alpha_fragmentation * parts["fragmentation_cost"]
        )
        reward = candidates.reward
        scores = cfg.lambda_utility * utility - cfg.lambda_cost * cost
        if cfg.lambda_reward and reward.any():
            scores = scores + cfg.lambda_reward * reward
        ranking = rank_by(
            self.name, scores, {"utility": utility, "cost": cost, "reward": reward, **parts, **phi}
        )
        return ranking

    def _remember(self, request_id: str, chosen: FloatArray, expected: FloatArray) -> None:
        self._traces[request_id] = _Trace(chosen, expected)
        if len(self._traces) > self._max_traces:
            self._traces.popitem(last=False)

    def on_feedback(self, outcome: Outcome) -> None:
        """Policy-gradient step on w (only with ``learn=True`` and a remembered decision)."""
        trace = self._traces.pop(outcome.request_id, None)
        if trace is None or not self.config.learn:
            return
        r = outcome.cached_ratio
        self._num_updates += 1
        # NOTE: the baseline is a running mean of r; it turns r into an advantage.
        self._baseline += (r - self._baseline) / min(self._num_updates, 100)
        step = self.config.learning_rate * (r - self._baseline) * (trace.chosen - trace.expected)
        self.w = _clip(self.w + step, 0.0, self.config.w_max)
