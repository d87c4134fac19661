"""The discrete-event cluster: replicas with real pools, routed by the real selection core.

Event loop (one heap, simulated seconds)::

    ARRIVAL   deliver due KV events -> core.select(...) (real policy code, speculative pending
              inserts) -> replica.enqueue; start an idle replica or cut its macro step
    STEP_DONE replica.finish -> feedback(Outcome) for completed requests, release closed-loop
              children -> take_events() queued for delivery at now + event_lag_s -> plan next
    SNAPSHOT  every snapshot_interval_s: due KV events, then each replica's LoadSnapshot
    SAMPLE    every sample_interval_s: PoolStats of up to ``max_sampled`` replicas (usage,
              utilisation, fragmentation; F_total is also fed back into the snapshots)

The core's clock is the simulated time, so pending-insert TTLs, access decay and staleness run
on simulated seconds. Nothing here models hits: they are whatever the pools return.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.sim.calibration import StepTimeModel
from benchmarks.sim.hashes import BlockHashMemo
from benchmarks.sim.replica import SeqState, SimReplica
from benchmarks.sim.results import (
    RequestRecord,
    RunSummary,
    percentile,
    stage_throughput,
)
from benchmarks.workloads.types import SimRequest, Workload
from cluster.core import CoreConfig, SelectorCore
from cluster.objective import ObjectiveConfig
from cluster.types import Outcome, SelectionRequest
from kvmanager.config import PoolConfig
from kvmanager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

# NOTE: at equal times the heap orders by kind: step completions, then arrivals, then KICK (an
# idle replica starts its step only after every request arriving at that instant is queued).
_STEP, _ARRIVAL, _SNAPSHOT, _SAMPLE, _KICK = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulated cluster. ``num_blocks`` None: the workload's ``kv_blocks_per_replica`` if
    set, else the calibration's capacity."""

    num_replicas: int
    policy: str
    model: StepTimeModel
    num_blocks: int | None = None
    eviction: str = "lru"
    allocator: str = "best_fit"
    event_lag_s: float = 0.02
    snapshot_interval_s: float = 0.05
    sample_interval_s: float = 5.0
    max_sampled: int = 8
    speculative: bool = True
    pending_ttl_s: float = 2.0
    objective: ObjectiveConfig | None = None
    max_macro_steps: int = 32
    defer_shared_prefill: bool = False
    load_metric: str = "uncached_work"
    seed: int = 0


class ClusterSim:
    """Runs one workload through one cluster configuration; ``run()`` returns the summary."""

    def __init__(self, config: SimConfig, workload: Workload) -> None:
        self.config = config
        self.workload = workload
        bs = workload.block_size
        num_blocks = config.num_blocks or workload.kv_blocks_per_replica or config.model.kv_blocks(bs)
        pool_cfg = PoolConfig(num_blocks=num_blocks, block_size=bs, eviction=config.eviction,
                              allocator=config.allocator)
        self.num_blocks = num_blocks
        self.now = 0.0
        core_cfg = CoreConfig(default_policy=config.policy, pending_ttl_s=config.pending_ttl_s,
                              stale_after_s=1e9, objective=config.objective or ObjectiveConfig())
        self.core = SelectorCore(core_cfg, clock=lambda: self.now)
        self.replicas = [
            SimReplica(f"r{i:03d}", pool_cfg, config.model, config.max_macro_steps,
                       config.defer_shared_prefill, config.load_metric)
            for i in range(config.num_replicas)
        ]
        self._by_id = {r.replica_id: r for r in self.replicas}
        for r in self.replicas:
            self.core.join(r.replica_id, block_size=bs, num_blocks=num_blocks)
        self._seq = {r.replica_id: -1 for r in self.replicas}
        self._deliveries: deque[tuple[float, str, list[KVEvent]]] = deque()
        self._memo = BlockHashMemo(self.replicas[0].pool.hasher, bs)
        self._heap: list[tuple[float, int, int, object]] = []
        self._counter = 0
        self._children: dict[str, list[SimRequest]] = {}
        self.records: list[RequestRecord] = []
        self._samples: list[tuple[float, float, float, float]] = []
        self._sample_cursor = 0

    # ------------------------------------------------------------------ heap
    def _push(self, t: float, kind: int, payload: object) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (t, kind, self._counter, payload))

    # ------------------------------------------------------------------ run
    def run(self, progress: Callable[[int], None] | None = None) -> RunSummary:
        """Simulate until every request completed; ``progress(n)`` is called per completion."""
        wall0 = time.perf_counter()
        for req in self.workload.requests:
            if req.parent_id is None:
                self._push(req.arrival_s, _ARRIVAL, req)
            else:
                self._children.setdefault(req.parent_id, []).append(req)
        cfg = self.config
        self._push(0.0, _SNAPSHOT, None)
        self._push(cfg.sample_interval_s, _SAMPLE, None)
        total = len(self.workload.requests)
        while self._heap and len(self.records) < total:
            t, kind, _, payload = heapq.heappop(self._heap)
            self.now = t
            if kind == _STEP:
                replica, version = payload  # type: ignore[misc]
                if version == replica.version:
                    self._on_step_done(replica, progress)
            elif kind == _ARRIVAL:
                self._on_arrival(payload)  # type: ignore[arg-type]
            elif kind == _KICK:
                replica = payload  # type: ignore[assignment]
                replica.kick_pending = False
                if replica.idle:
                    self._start(replica)
            elif kind == _SNAPSHOT:
                self._deliver_due()
                for r in self.replicas:
                    self.core.update_load(r.replica_id, r.snapshot())
                self._push(t + cfg.snapshot_interval_s, _SNAPSHOT, None)
            else:
                self._sample()
                self._push(t + cfg.sample_interval_s, _SAMPLE, None)
        if len(self.records) < total:
            raise RuntimeError(f"simulation stalled: {len(self.records)}/{total} completed")
        return self._summary(time.perf_counter() - wall0)

    # ------------------------------------------------------------------ handlers
    def _on_arrival(self, req: SimRequest) -> None:
        self._deliver_due()
        bs = self.workload.block_size
        hashes = self._memo.hashes(req.prompt_blocks)
        sel = self.core.select(
            SelectionRequest(req.request_id, hashes, len(req.prompt_blocks) * bs,
                             req.num_output_tokens, req.session_id),
            speculative=self.config.speculative,
        )
        assert sel.replica_id is not None, "no replica to route to"
        replica = self._by_id[sel.replica_id]
        prompt_len = len(req.prompt_blocks) * bs
        # NOTE: a list, not an ndarray: the pool's hasher packs Python ints ~5x faster.
        replica.enqueue(SeqState(req, req.token_ids(bs).tolist(), self.now, prompt_len, prompt_len))
        if replica.idle:
            if not replica.kick_pending:
                replica.kick_pending = True
                self._push(self.now, _KICK, replica)
        else:
            end = replica.cut(self.now)
            if end is not None:
                self._push(end, _STEP, (replica, replica.version))

    def _start(self, replica: SimReplica) -> None:
        end = replica.plan(self.now)
        self._publish(replica)
        if end is not None:
            self._push(end, _STEP, (replica, replica.version))

    def _on_step_done(self, replica: SimReplica, progress: Callable[[int], None] | None) -> None:
        for s in replica.finish(self.now):
            rec = RequestRecord(s.req.request_id, replica.replica_id, s.arrival_s,
                                s.first_token_s, s.finish_s, s.prompt_len,
                                max(s.num_cached_tokens, 0), s.req.num_output_tokens,
                                s.num_preemptions)
            self.records.append(rec)
            self.core.feedback(Outcome(rec.request_id, rec.replica_id, rec.num_prompt_tokens,
                                       rec.num_cached_tokens, rec.ttft_s, rec.num_output_tokens))
            for child in self._children.pop(s.req.request_id, ()):
                self._push(max(child.arrival_s, self.now + child.think_time_s), _ARRIVAL, child)
            if progress is not None:
                progress(1)
        self._start(replica)

    def _publish(self, replica: SimReplica) -> None:
        events = replica.pool.take_events()
        if not events:
            return
        for ev in events:
            if isinstance(ev, BlockStored):
                replica.num_cached_blocks += len(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                replica.num_cached_blocks -= len(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                replica.num_cached_blocks = 0
        self._deliveries.append((self.now + self.config.event_lag_s, replica.replica_id, events))

    def _deliver_due(self) -> None:
        q = self._deliveries
        while q and q[0][0] <= self.now:
            _, rid, events = q.popleft()
            self._seq[rid] += 1
            res = self.core.apply_events(rid, self._seq[rid], events)
            assert res.applied, f"event batch for {rid} rejected: {res}"

    def _sample(self) -> None:
        n = len(self.replicas)
        k = min(self.config.max_sampled, n)
        for j in range(k):
            r = self.replicas[(self._sample_cursor + j) % n]
            st = r.pool.stats()
            r.f_total = st.f_total
            self._samples.append((st.usage, st.utilization, st.external_fragmentation, st.f_total))
        self._sample_cursor = (self._sample_cursor + k) % n

    # ------------------------------------------------------------------ summary
    def _summary(self, wall_s: float) -> RunSummary:
        recs = self.records
        ttft = np.asarray([r.ttft_s for r in recs])
        e2e = np.asarray([r.finish_s - r.arrival_s for r in recs])
        first = min(r.arrival_s for r in recs)
        last = max(r.finish_s for r in recs)
        span = max(last - first, 1e-9)
        out_tokens = sum(r.num_output_tokens for r in recs)
        stats = [r.pool.stats() for r in self.replicas]
        q = sum(s.prefix_query_tokens for s in stats)
        busy = np.asarray([r.busy_s for r in self.replicas])
        work = np.asarray([r.num_tokens_processed for r in self.replicas], np.float64)
        samples = np.asarray(self._samples) if self._samples else np.zeros((1, 4))
        prompt = sum(r.num_prompt_tokens for r in recs)
        return RunSummary(
            workload=self.workload.name, policy=self.config.policy,
            num_replicas=len(self.replicas), seed=self.workload.seed, num_requests=len(recs),
            ttft_p50_s=percentile(ttft, 50), ttft_p90_s=percentile(ttft, 90),
            ttft_p99_s=percentile(ttft, 99), ttft_mean_s=float(ttft.mean()),
            e2e_p99_s=percentile(e2e, 99),
            throughput_tok_s=out_tokens / span, throughput_req_s=len(recs) / span,
            hit_ratio=sum(s.prefix_hit_tokens for s in stats) / q if q else 0.0,
            request_hit_ratio=sum(r.num_cached_tokens for r in recs) / prompt if prompt else 0.0,
            imbalance=float(work.max() / work.mean()) if work.mean() > 0 else 1.0,
            usage=float(samples[:, 0].mean()), utilization=float(samples[:, 1].mean()),
            external_fragmentation=float(samples[:, 2].mean()), f_total=float(samples[:, 3].mean()),
            num_preemptions=sum(r.num_preemptions for r in self.replicas),
            num_evicted_blocks=sum(s.num_evicted_blocks for s in stats),
            makespan_s=span, sim_wall_s=wall_s,
            stage_throughput_tok_s=stage_throughput(recs, self.workload.stages),
            extra={"num_blocks_per_replica": self.num_blocks,
                   "busy_fraction": float(busy.mean() / span),
                   "num_steps": sum(r.num_steps for r in self.replicas)},
        )


def simulate(config: SimConfig, workload: Workload) -> RunSummary:
    """Convenience: one run."""
    return ClusterSim(config, workload).run()
