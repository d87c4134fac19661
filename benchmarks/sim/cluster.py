"""The discrete-event cluster: replicas with real pools, routed by the real selection core.

Event loop (one heap, simulated seconds)::

    ARRIVAL   deliver due KV events -> core.select(...) (real policy code, speculative pending
              inserts) -> replica.enqueue; start an idle replica or cut its macro step
    STEP_DONE replica.finish -> feedback(Outcome) for completed requests, release closed-loop
              children -> take_events() queued for delivery at now + event_lag_s -> plan next
    SNAPSHOT  every snapshot_interval_s: due KV events, then each replica's LoadSnapshot
    SAMPLE    every sample_interval_s: PoolStats of up to ``max_sampled`` replicas (usage,
              utilisation, fragmentation; F_total is also fed back into the snapshots)

Speed (issue 7: 256 replicas x 1M requests): Select asks for the winner only
(``max_results=1``; the full ranking is built only for the wire), the pools share one
memoising hasher, and a SNAPSHOT re-reports only replicas whose state changed since their last
report (an unchanged replica's report would be identical, and nothing was routed to it since).
``SimConfig(reference=True)`` turns all three off; a test checks both give identical figures.

The core's clock is the simulated time, so pending-insert TTLs, access decay and staleness run
on simulated seconds. Nothing here models hits: they are whatever the pools return.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.sim.calibration import StepTimeModel
from benchmarks.sim.hashes import BlockHashMemo, MemoHasher
from benchmarks.sim.oracle import Oracle
from benchmarks.sim.replica import SeqState, SimReplica
from benchmarks.sim.results import (
    RequestRecord,
    RunSummary,
    percentile,
    stage_throughput,
)
from benchmarks.sim.scenarios import resolve
from benchmarks.workloads.types import SimRequest, Workload
from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.objective import ObjectiveConfig
from cluster.selector.types import Outcome, SelectionRequest
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
    share_in_step: bool = True  # blocks hashed when scheduled, as replicas/scheduler.py does
    load_metric: str = "uncached_work"
    seed: int = 0
    reference: bool = False  # the unoptimised paths (full ranking, plain hashing, all snapshots)
    keep_records: bool = True  # False: no RequestRecord per request (1M-request runs)
    # False: replicas report no measured rates, so the objective's configured rate stands in
    # (the behaviour before issue 20, kept to show what measuring changes).
    report_rates: bool = True
    # fault scenario (benchmarks/sim/scenarios.py: hetero, slowdown, lossy_events; '' = none);
    # ``scenario_reported``: slowed replicas' rate meters see their real step times.
    scenario: str = ""
    scenario_reported: bool = False
    # benchmark-only upper bound, never a default: the core is given the true speed / cache /
    # load ('+'-joined parts or 'all'; benchmarks/sim/oracle.py)
    oracle: str = ""


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
                              stale_after_s=1e9, objective=config.objective or ObjectiveConfig(),
                              seed=config.seed)
        self.core = SelectorCore(core_cfg, clock=lambda: self.now)
        span = max((r.arrival_s for r in workload.requests), default=0.0)
        self.faults = resolve(config.scenario, config.num_replicas, span, config.scenario_reported)
        self.replicas = [
            SimReplica(f"r{i:03d}", pool_cfg, config.model, config.max_macro_steps,
                       config.share_in_step, config.load_metric, config.report_rates,
                       self.faults.speed_windows(i), self.faults.reported)
            for i in range(config.num_replicas)
        ]
        # NOTE: its own stream, so a lossy replica's drops never shift another random draw.
        self._drop_rng = np.random.default_rng([config.seed, 20])
        self.oracle = Oracle.parse(config.oracle)
        if self.oracle.speed and self.faults.reported:
            raise ValueError("oracle 'speed' scales the nominal rates: not with scenario_reported")
        self._lag = self.oracle.event_lag(config.event_lag_s)
        self._drop_p = [self.oracle.drop_probability(self.faults.drop_probability(i))
                        for i in range(config.num_replicas)]
        self.num_dropped_events = 0
        self._by_id = {r.replica_id: r for r in self.replicas}
        for r in self.replicas:
            self.core.join(r.replica_id, block_size=bs, num_blocks=num_blocks)
        self._seq = {r.replica_id: -1 for r in self.replicas}
        self._deliveries: deque[tuple[float, str, list[KVEvent]]] = deque()
        self._memo = BlockHashMemo(self.replicas[0].pool.hasher, bs)
        if not config.reference:
            pool_hasher = MemoHasher(self.replicas[0].pool.hasher)
            for r in self.replicas:
                r.pool.hasher = pool_hasher
        self._max_results = 0 if config.reference else 1
        # NOTE: replicas whose load report may differ from the one the core holds (routed to,
        # stepped, sampled); all of them at the start.
        self._dirty = [True] * len(self.replicas)
        self._index = {r.replica_id: i for i, r in enumerate(self.replicas)}
        self._heap: list[tuple[float, int, int, object]] = []
        self._counter = 0
        self._children: dict[str, list[SimRequest]] = {}
        self.records: list[RequestRecord] = []
        # NOTE: what the summary needs of every completed request, in completion order, as
        # compact columns (~50 bytes per request; RequestRecord objects only with keep_records).
        self._arrival, self._first, self._finish = array("d"), array("d"), array("d")
        self._prompt, self._cached, self._out = array("q"), array("q"), array("q")
        self.num_completed = 0
        self._open: list[SimRequest] = []
        self._samples: list[tuple[float, float, float, float]] = []
        self._sample_cursor = 0

    # ------------------------------------------------------------------ heap
    def _push(self, t: float, kind: int, payload: object) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (t, kind, self._counter, payload))

    def _push_open(self, j: int) -> None:
        """Open-loop arrival ``j`` enters the heap when arrival ``j - 1`` is handled (the heap
        stays small). NOTE: with tie-break counter ``j + 1``, exactly the counter it had when
        every arrival was pushed up front, so the event order is unchanged."""
        if j < len(self._open):
            req = self._open[j]
            heapq.heappush(self._heap, (req.arrival_s, _ARRIVAL, j + 1, (req, j)))

    # ------------------------------------------------------------------ run
    def run(self, progress: Callable[[int], None] | None = None) -> RunSummary:
        """Simulate until every request completed; ``progress(n)`` is called per completion."""
        wall0 = time.perf_counter()
        for req in self.workload.requests:
            if req.parent_id is None:
                self._open.append(req)
            else:
                self._children.setdefault(req.parent_id, []).append(req)
        self._push_open(0)
        self._counter = len(self._open)
        cfg = self.config
        self._push(0.0, _SNAPSHOT, None)
        self._push(cfg.sample_interval_s, _SAMPLE, None)
        total = len(self.workload.requests)
        while self._heap and self.num_completed < total:
            t, kind, _, payload = heapq.heappop(self._heap)
            self.now = t
            if kind == _STEP:
                replica, version = payload  # type: ignore[misc]
                if version == replica.version:
                    self._on_step_done(replica, progress)
            elif kind == _ARRIVAL:
                req, j = payload  # type: ignore[misc]
                if j >= 0:
                    self._push_open(j + 1)
                self._on_arrival(req)
            elif kind == _KICK:
                replica = payload  # type: ignore[assignment]
                replica.kick_pending = False
                if replica.idle:
                    self._start(replica)
            elif kind == _SNAPSHOT:
                self._deliver_due()
                self._report(cfg.reference)
                self._push(t + cfg.snapshot_interval_s, _SNAPSHOT, None)
            else:
                self._sample()
                self._push(t + cfg.sample_interval_s, _SAMPLE, None)
        if self.num_completed < total:
            raise RuntimeError(f"simulation stalled: {self.num_completed}/{total} completed")
        return self._summary(time.perf_counter() - wall0)

    def _report(self, everyone: bool) -> None:
        """Load reports of the replicas whose state changed (all with ``everyone``; with the
        speed oracle also every replica with a speed window, so a speed change is seen)."""
        dirty, oracle, now = self._dirty, self.oracle, self.now
        for i, r in enumerate(self.replicas):
            if dirty[i] or everyone or (oracle.speed and r.speed_windows):
                dirty[i] = False
                self.core.update_load(r.replica_id, oracle.report(r.snapshot(), r.speed_windows, now))

    # ------------------------------------------------------------------ handlers
    def _on_arrival(self, req: SimRequest) -> None:
        self._deliver_due()
        if self.oracle.load:
            self._report(False)
        bs = self.workload.block_size
        hashes = self._memo.hashes(req.prompt_blocks)
        sel = self.core.select(
            SelectionRequest(req.request_id, hashes, len(req.prompt_blocks) * bs,
                             req.num_output_tokens, req.session_id),
            speculative=self.config.speculative, max_results=self._max_results,
        )
        assert sel.replica_id is not None, "no replica to route to"
        replica = self._by_id[sel.replica_id]
        self._dirty[self._index[sel.replica_id]] = True
        prompt_len = len(req.prompt_blocks) * bs
        replica.enqueue(SeqState(req, expand_tokens(req, bs), self.now, prompt_len, prompt_len))
        if replica.idle:
            if not replica.kick_pending:
                replica.kick_pending = True
                self._push(self.now, _KICK, replica)
        else:
            end = replica.cut(self.now)
            if end is not None:
                self._push(end, _STEP, (replica, replica.version))

    def _start(self, replica: SimReplica) -> None:
        self._dirty[self._index[replica.replica_id]] = True
        end = replica.plan(self.now)
        self._publish(replica)
        if end is not None:
            self._push(end, _STEP, (replica, replica.version))

    def _on_step_done(self, replica: SimReplica, progress: Callable[[int], None] | None) -> None:
        for s in replica.finish(self.now):
            req, cached = s.req, max(s.num_cached_tokens, 0)
            if self.config.keep_records:
                self.records.append(RequestRecord(
                    req.request_id, replica.replica_id, s.arrival_s, s.first_token_s, s.finish_s,
                    s.prompt_len, cached, req.num_output_tokens, s.num_preemptions))
            self.num_completed += 1
            self._arrival.append(s.arrival_s)
            self._first.append(s.first_token_s)
            self._finish.append(s.finish_s)
            self._prompt.append(s.prompt_len)
            self._cached.append(cached)
            self._out.append(req.num_output_tokens)
            self.core.feedback(Outcome(req.request_id, replica.replica_id, s.prompt_len, cached,
                                       s.first_token_s - s.arrival_s, req.num_output_tokens))
            for child in self._children.pop(req.request_id, ()):
                self._push(max(child.arrival_s, self.now + child.think_time_s), _ARRIVAL,
                           (child, -1))
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
        p = self._drop_p[self._index[replica.replica_id]]
        if p > 0.0:
            events = self._lossy(events, p)
            if not events:
                return
        self._deliveries.append((self.now + self._lag, replica.replica_id, events))

    def _lossy(self, events: list[KVEvent], p: float) -> list[KVEvent]:
        """``events`` with each block's stored/removed notice lost with probability ``p``
        (the lossy_events scenario). NOTE: per block, not per event object: one BlockStored
        carries a whole prefill's blocks, so dropping objects would lose all or nothing."""
        out: list[KVEvent] = []
        for ev in events:
            if isinstance(ev, BlockStored | BlockRemoved):
                keep = self._drop_rng.random(len(ev.block_hashes)) >= p
                self.num_dropped_events += int(len(keep) - keep.sum())
                hashes = [h for h, k in zip(ev.block_hashes, keep, strict=True) if k]
                if not hashes:
                    continue
                if isinstance(ev, BlockStored):
                    # NOTE: the core's index reads hashes and medium only (no tokens needed).
                    ev = dataclasses.replace(ev, block_hashes=hashes, token_ids=[])
                else:
                    ev = dataclasses.replace(ev, block_hashes=hashes)
            out.append(ev)
        return out

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
            i = (self._sample_cursor + j) % n
            r = self.replicas[i]
            self._dirty[i] = True
            st = r.pool.stats()
            r.f_total = st.f_total
            self._samples.append((st.usage, st.utilization, st.external_fragmentation, st.f_total))
        self._sample_cursor = (self._sample_cursor + k) % n

    # ------------------------------------------------------------------ summary
    def _summary(self, wall_s: float) -> RunSummary:
        arrival, finish = np.asarray(self._arrival), np.asarray(self._finish)
        ttft = np.asarray(self._first) - arrival
        e2e = finish - arrival
        n = self.num_completed
        first = float(arrival.min())
        last = float(finish.max())
        span = max(last - first, 1e-9)
        arrival_span = max(float(arrival.max()) - first, 1e-9)
        out = np.asarray(self._out)
        out_tokens = int(out.sum())
        stats = [r.pool.stats() for r in self.replicas]
        q = sum(s.prefix_query_tokens for s in stats)
        busy = np.asarray([r.busy_s for r in self.replicas])
        work = np.asarray([r.num_tokens_processed for r in self.replicas], np.float64)
        samples = np.asarray(self._samples) if self._samples else np.zeros((1, 4))
        prompt = int(np.asarray(self._prompt).sum())
        cached = int(np.asarray(self._cached).sum())
        return RunSummary(
            workload=self.workload.name, policy=self.config.policy,
            num_replicas=len(self.replicas), seed=self.workload.seed, num_requests=n,
            ttft_p50_s=percentile(ttft, 50), ttft_p90_s=percentile(ttft, 90),
            ttft_p99_s=percentile(ttft, 99), ttft_mean_s=float(ttft.mean()),
            e2e_p99_s=percentile(e2e, 99),
            throughput_tok_s=out_tokens / span, throughput_req_s=n / span,
            hit_ratio=sum(s.prefix_hit_tokens for s in stats) / q if q else 0.0,
            request_hit_ratio=cached / prompt if prompt else 0.0,
            imbalance=float(work.max() / work.mean()) if work.mean() > 0 else 1.0,
            usage=float(samples[:, 0].mean()), utilization=float(samples[:, 1].mean()),
            external_fragmentation=float(samples[:, 2].mean()), f_total=float(samples[:, 3].mean()),
            num_preemptions=sum(r.num_preemptions for r in self.replicas),
            num_evicted_blocks=sum(s.num_evicted_blocks for s in stats),
            makespan_s=span, sim_wall_s=wall_s,
            stage_throughput_tok_s=stage_throughput(finish, out, self.workload.stages),
            offered_load_req_s=n / arrival_span, offered_load_tok_s=(prompt + out_tokens) / arrival_span,
            cluster_utilization=float(busy.mean() / span),
            extra={"num_blocks_per_replica": self.num_blocks,
                   "busy_fraction": float(busy.mean() / span),
                   "num_steps": sum(r.num_steps for r in self.replicas),
                   "num_dropped_events": self.num_dropped_events},
        )


def expand_tokens(req: SimRequest, block_size: int) -> list[int]:
    """``req.token_ids(block_size).tolist()`` built from the content ids directly. NOTE: a list,
    not an ndarray (the pool's hasher packs Python ints ~5x faster), and without the ndarray
    round trip, which allocated one int object per token (~0.5 ms per gsp request)."""
    out: list[int] = []
    for c in req.prompt_blocks + req.output_blocks:
        out += [c] * block_size
    return out


def simulate(config: SimConfig, workload: Workload) -> RunSummary:
    """Convenience: one run."""
    return ClusterSim(config, workload).run()


def simulate_records(config: SimConfig, workload: Workload) -> list[RequestRecord]:
    """One run's per-request records (completion order); needs ``keep_records``."""
    if not config.keep_records:
        raise ValueError("simulate_records needs SimConfig(keep_records=True)")
    sim = ClusterSim(config, workload)
    sim.run()
    return sim.records
