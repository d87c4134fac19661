"""One simulated replica: a continuous-batching engine over a REAL ``KVCacheManager`` pool.

Scheduling follows vLLM v1's shape: each step first serves running sequences in admission
order (one token per decoding sequence, the next chunk of a partial prefill), then admits
waiting sequences FCFS while the token budget (``max_num_batched_tokens``) and
``max_num_seqs`` allow. Admission does ``lookup_prefix`` + ``allocate_slots`` on the real pool
(hits, best-fit allocation and eviction are the pool's own); a failed admission waits
(backpressure); a failed allocation for a running sequence preempts the youngest running
sequence (recompute later). With ``share_in_step`` (the engine's behaviour) prefill chunks are
committed when planned, as ``replicas/scheduler.py`` does, so a sequence admitted later in the
same step hits the blocks this step computes.

Time: ``plan(now)`` builds one step and returns its end time; the cluster calls
``finish(end)`` at that time, which commits the rest of the step's K/V to the pool (all of it
without ``share_in_step``), records first tokens and frees completed sequences. NOTE:
decode-only stretches are planned as a *macro step* of up to ``max_macro_steps`` decode steps
(one event instead of k); ``cut(now)`` shortens it to the step in progress when a new request
arrives, so arrivals still join at a real step boundary.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from benchmarks.sim.calibration import StepTimeModel
from benchmarks.sim.scenarios import speed_at
from benchmarks.workloads.types import SimRequest
from cluster.selector.types import LoadSnapshot
from kvmanager.config import PoolConfig
from kvmanager.manager import KVCacheManager
from replicas.rate_meter import RateMeter, Rates

# NOTE: "uncached_work" (tokens still to compute) mirrors replicas/deployment.py's load report;
# "inflight_tokens" (prompt + max_tokens of every in-flight request, cached or not) is what it
# reported before, kept to reproduce the earlier routing results.
LOAD_METRICS = ("inflight_tokens", "uncached_work")


@dataclass(slots=True, eq=False)
class SeqState:
    """Engine-side state of one request. ``prefill_target`` is the number of tokens whose K/V
    must exist before the next token is sampled (the prompt; after a preemption, everything
    computed so far)."""

    req: SimRequest
    tokens: list[int]
    arrival_s: float
    prompt_len: int
    prefill_target: int
    num_computed: int = 0
    num_generated: int = 0
    num_cached_tokens: int = -1
    first_token_s: float = -1.0
    finish_s: float = -1.0
    num_preemptions: int = 0
    # NOTE: token slots the pool allocated, and num_computed as last committed to the pool. The
    # replica skips pool calls that would change nothing (no new block needed, no block filled).
    num_slots: int = 0
    pool_computed: int = 0


@dataclass(slots=True, eq=False)
class _Plan:
    start: float
    prefill: list[tuple[SeqState, int]]
    decode: list[SeqState]
    cum: list[float] = field(default_factory=list)  # cumulative end offsets of the k steps
    speed: float = 1.0  # the replica's speed factor when the step started (scenarios.py)

    @property
    def k(self) -> int:
        return len(self.cum)


class SimReplica:
    """Engine model of one replica (single-threaded, driven by ``ClusterSim``)."""

    def __init__(
        self, replica_id: str, pool_config: PoolConfig, model: StepTimeModel,
        max_macro_steps: int = 32, share_in_step: bool = True,
        load_metric: str = "uncached_work", report_rates: bool = True,
        speed_windows: list[tuple[float, float, float]] | None = None,
        slow_reported: bool = False,
    ) -> None:
        self.replica_id = replica_id
        self.pool = KVCacheManager(pool_config)
        self.model = model
        self.max_macro_steps = max_macro_steps
        self.share_in_step = share_in_step
        if load_metric not in LOAD_METRICS:
            raise ValueError(f"load_metric must be one of {LOAD_METRICS}, got {load_metric!r}")
        self.load_metric = load_metric
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.plan_: _Plan | None = None
        self.version = 0  # bumped whenever the step in flight changes its end time
        self.kick_pending = False  # a start is scheduled at the current instant
        self.busy_s = 0.0
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_routed = 0
        self.num_tokens_processed = 0  # prefill + decode tokens run (the imbalance measure)
        self.num_cached_blocks = 0  # maintained from the pool's own events by the cluster
        self.ttft_ewma_s = 0.0
        self.step_ewma_s = 0.0
        self.f_total = 0.0
        # NOTE: the replica's own measured rates, as replicas/rate_meter.py: a start-up probe
        # (prefills of a full and a quarter step budget, a decode step, as
        # replicas.rate_meter.calibrate), then the step-time fit over the simulated steps.
        self.rates = RateMeter()
        self.report_rates = report_rates
        # NOTE: fault scenarios (benchmarks/sim/scenarios.py): step times divided by the speed
        # in force; unless ``slow_reported``, the rate meter still sees the nominal times.
        self.speed_windows = speed_windows or []
        self.slow_reported = slow_reported
        budget = model.max_num_batched_tokens
        for n in (budget, max(budget // 4, 1)):
            self.rates.observe(n, 0, model.prefill_time(n))
            self.rates.observe(0, 1, model.step_time(1, 1, 0.0, n))

    # ------------------------------------------------------------------ queue
    @property
    def idle(self) -> bool:
        return self.plan_ is None

    def enqueue(self, seq: SeqState) -> None:
        self.waiting.append(seq)
        self.num_routed += 1

    # ------------------------------------------------------------------ planning
    def plan(self, now: float) -> float | None:
        """Schedule the next step starting at ``now``; returns its end time (None: nothing to
        run, the replica goes idle)."""
        m = self.model
        budget = m.max_num_batched_tokens
        prefill: list[tuple[SeqState, int]] = []
        decode: list[SeqState] = []
        for s in list(self.running):
            if budget <= 0:
                break
            if s not in self.running:  # preempted by an older sequence of this step
                continue
            in_prefill = s.num_computed < s.prefill_target
            n = min(s.prefill_target - s.num_computed, budget) if in_prefill else 1
            if not self._grow(s, n):
                continue
            if in_prefill:
                prefill.append((s, n))
                self._commit_ahead(s, n)
            else:
                decode.append(s)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < m.max_num_seqs:
            s = self.waiting[0]
            n = self._admit(s, budget)
            if n is None:
                break
            self.waiting.popleft()
            self.running.append(s)
            prefill.append((s, n))
            self._commit_ahead(s, n)
            budget -= n
        if not prefill and not decode:
            if self.waiting and not self.running:
                raise RuntimeError(
                    f"{self.replica_id}: request {self.waiting[0].req.request_id} cannot fit an "
                    f"empty pool of {self.pool.num_blocks} blocks"
                )
            self.plan_ = None
            return None
        plan = _Plan(now, prefill, decode)
        self._time(plan)
        self.plan_ = plan
        self.version += 1
        self.num_steps += plan.k
        self.busy_s += plan.cum[-1]
        self.num_tokens_processed += sum(n for _, n in prefill) + plan.k * len(decode)
        return now + plan.cum[-1]

    def _admit(self, s: SeqState, budget: int) -> int | None:
        rid = s.req.request_id
        hit = self.pool.lookup_prefix(s.tokens[: s.prefill_target])
        n = min(s.prefill_target - hit.num_cached_tokens, budget)
        expected = s.prompt_len + s.req.num_output_tokens
        new = self.pool.allocate_slots(rid, s.tokens, n, hit, expected_num_tokens=expected)
        if new is None:
            return None
        s.num_computed = s.pool_computed = self.pool.num_computed_tokens(rid)
        s.num_slots = s.num_computed + len(new) * self.pool.block_size
        if s.num_cached_tokens < 0:
            s.num_cached_tokens = s.num_computed
        return n

    def _grow(self, s: SeqState, n: int) -> bool:
        """Allocate ``n`` more tokens for running ``s``, preempting the youngest others; False
        when ``s`` itself had to be preempted."""
        while not self._reserve(s, n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is s:
                return False
        return True

    def _reserve(self, s: SeqState, n: int) -> bool:
        """Make sure ``s`` has slots for ``n`` tokens past num_computed (no preemption)."""
        target = s.num_computed + n
        if target <= s.num_slots:
            return True
        new = self.pool.allocate_slots(s.req.request_id, s.tokens, target - s.pool_computed)
        if new is None:
            return False
        s.num_slots += len(new) * self.pool.block_size
        return True

    def _commit(self, s: SeqState, upto: int) -> None:
        bs = self.pool.block_size
        if upto // bs > s.pool_computed // bs:
            self.pool.commit(s.req.request_id, s.tokens, upto)
            s.pool_computed = upto

    def _commit_ahead(self, s: SeqState, n: int) -> None:
        """``share_in_step``: commit the ``n`` prefill tokens planned for ``s`` now, not at the
        step's end (the engine hashes at schedule time; its attention writes a step's K/V before
        reading it, so a later admission of the same step may already reuse these blocks)."""
        if self.share_in_step:
            self._commit(s, s.num_computed + n)

    def _preempt(self, v: SeqState) -> None:
        self.pool.free(v.req.request_id)
        self.running.remove(v)
        v.prefill_target = max(v.prefill_target, v.num_computed)
        v.num_computed = v.num_slots = v.pool_computed = 0
        v.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(v)

    def _time(self, plan: _Plan) -> None:
        m = self.model
        n_pre = sum(n for _, n in plan.prefill)
        pairs = sum(n * (s.num_computed + n / 2) for s, n in plan.prefill)
        b = len(plan.decode)
        ctx = sum(s.num_computed for s in plan.decode)
        seqs = len(plan.prefill) + b
        k = 1
        # NOTE: no prefill planned means nothing waiting was admissible; that stays so until a
        # completion (which ends the macro step) or an arrival (which cuts it).
        if not plan.prefill and self.max_macro_steps > 1:
            k = min(self.max_macro_steps, *(s.req.num_output_tokens - s.num_generated for s in plan.decode))
            k = max(k, 1)
            if k > 1 and not all(self._reserve(s, k) for s in plan.decode):
                k = 1  # NOTE: blocks already grown stay in the tables; later steps use them.
        speed = speed_at(self.speed_windows, plan.start) if self.speed_windows else 1.0
        t, cum = 0.0, []
        for i in range(k):
            t += m.step_time(n_pre + b, seqs, pairs, ctx + i * b) / speed
            cum.append(t)
        plan.cum = cum
        plan.speed = speed

    # ------------------------------------------------------------------ step completion
    def cut(self, now: float) -> float | None:
        """A request arrived mid macro step: end it at the step in progress. Returns the new
        end time, or None when the step in flight is already a single step."""
        plan = self.plan_
        if plan is None or plan.k <= 1:
            return None
        done = bisect.bisect_right(plan.cum, now - plan.start)
        keep = min(done + 1, plan.k)
        if keep >= plan.k:
            return None
        self.busy_s -= plan.cum[-1] - plan.cum[keep - 1]
        self.num_steps -= plan.k - keep
        self.num_tokens_processed -= (plan.k - keep) * len(plan.decode)
        del plan.cum[keep:]
        self.version += 1
        return plan.start + plan.cum[-1]

    def finish(self, now: float) -> list[SeqState]:
        """Apply the step in flight (ending at ``now``); returns the sequences it completed."""
        plan = self.plan_
        assert plan is not None, "finish() without a planned step"
        self.plan_ = None
        self.step_ewma_s += 0.1 * (plan.cum[-1] / plan.k - self.step_ewma_s)
        n_pre = sum(n for _, n in plan.prefill)
        seen = plan.cum[-1] if self.slow_reported else plan.cum[-1] * plan.speed
        self.rates.observe(n_pre, len(plan.decode) * plan.k, seen, num_steps=plan.k)
        done: list[SeqState] = []
        for s, n in plan.prefill:
            s.num_computed += n
            self._commit(s, s.num_computed)
            if s.num_computed == s.prefill_target and s.first_token_s < 0:
                s.first_token_s = now
                s.num_generated = 1
                self.ttft_ewma_s += 0.1 * (now - s.arrival_s - self.ttft_ewma_s)
                if s.num_generated >= s.req.num_output_tokens:
                    done.append(s)
        k = plan.k
        for s in plan.decode:
            s.num_computed += k
            s.num_generated += k
            self._commit(s, s.num_computed)
            if s.num_generated >= s.req.num_output_tokens:
                done.append(s)
        for s in done:
            s.finish_s = now
            self.pool.free(s.req.request_id)
            self.running.remove(s)
        return done

    # ------------------------------------------------------------------ observability
    def snapshot(self) -> LoadSnapshot:
        """Load report for the selection service; running tokens per ``load_metric``, waiting
        tokens = prompt + output of every queued request."""
        pool = self.pool
        free = pool.num_free_blocks
        if self.load_metric == "uncached_work":
            # NOTE: a decoding sequence has num_computed > prefill_target; without the clamp
            # its load went negative (outputs owed minus tokens already decoded, twice).
            run_tokens = sum(max(s.prefill_target - s.num_computed, 0) + s.req.num_output_tokens
                             - s.num_generated for s in self.running)
        else:
            run_tokens = sum(s.prefill_target + s.req.num_output_tokens for s in self.running)
        wait_tokens = sum(s.prefill_target + s.req.num_output_tokens for s in self.waiting)
        rates = self.rates.rates() if self.report_rates else Rates()
        return LoadSnapshot(
            num_blocks=pool.num_blocks,
            num_free_blocks=free,
            num_cached_blocks=self.num_cached_blocks,
            num_used_blocks=pool.num_blocks - free,
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            num_running_tokens=run_tokens,
            num_waiting_tokens=wait_tokens,
            ttft_ewma_s=self.ttft_ewma_s,
            step_time_ewma_s=self.step_ewma_s,
            f_total=self.f_total,
            usage=(pool.num_blocks - free) / pool.num_blocks,
            prefill_tokens_per_s=rates.prefill_tokens_per_s,
            decode_tokens_per_s=rates.decode_tokens_per_s,
        )
