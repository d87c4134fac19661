"""SelectorCore: the in-process selection service (index + replicas + policies), no gRPC.

The gRPC servicer, the vLLM ZMQ adapter and the discrete-event simulator all drive this one
object. Every public method takes the core's lock, so callers on different threads (the aio
loop, a ZMQ subscriber thread) are safe; each call is short. Taking the lock first makes the
route a ``select_wire(defer=True)`` still owes (``CoreLock``): no call sees the index without
it. Policies, ranking and routing live in ``core_select.py`` (``CoreSelection``); this file
holds the state, membership, ingestion, feedback and stats.

Replica stream protocol (per replica): ``join`` -> ``resync(seq=S)`` -> ``apply_events(S+1)``,
``apply_events(S+2)``, ... A batch whose seq is not ``last_seq + 1`` is not applied: the result
says ``resync_required`` and the replica is marked unsynced until the next resync. A fresh
replica may skip the resync and start at seq 0 (empty cache). ``clock`` is injectable
(simulated time).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cluster.selector import access, objective_kernel, select_kernel
from cluster.selector.access import AccessTracker
from cluster.selector.core_select import CoreLock, CoreSelection
from cluster.selector.core_types import (
    ApplyResult,
    CoreStats,
    ReplicaStatus,
)
from cluster.selector.core_types import (
    CoreConfig as CoreConfig,  # NOTE: re-exported: callers build the core from here
)
from cluster.selector.index import KVIndex
from cluster.selector.metrics import SelectorMetrics
from cluster.selector.objective import TinyServeObjective
from cluster.selector.policy import Policy, policy_names
from cluster.selector.ranker import Ranker
from cluster.selector.replica_table import _FLOAT_COLS, _INT_COLS, ReplicaRecord, ReplicaTable
from cluster.selector.reward import RewardBook, corrected_rate
from cluster.selector.types import LoadSnapshot, Outcome
from cluster.selector.wire_select import WireSelect
from kvmanager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

# NOTE: the fast path's kernels read ReplicaTable columns by position; these names pin them.
assert _INT_COLS[:4] == ("block_size", "num_blocks", "num_free_blocks", "num_cached_blocks")
assert _INT_COLS[6] == "num_queued_tokens" and _FLOAT_COLS[:2] == ("ttft_ewma_s", "f_total")
assert _FLOAT_COLS[3] == "reward" and _FLOAT_COLS[4] == "prefill_tokens_per_s"


class SelectorCore(CoreSelection):
    """Global KV view and replica ranking. See the module docstring for the protocol."""

    def __init__(
        self,
        config: CoreConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: SelectorMetrics | None = None,
    ) -> None:
        self.config = config or CoreConfig()
        if self.config.default_policy not in policy_names():
            raise ValueError(f"unknown default policy {self.config.default_policy!r}")
        self.clock = clock
        self.metrics = metrics or SelectorMetrics()
        self._lock = CoreLock(self)
        # NOTE: (request bytes, now, answer latency) of a select_wire(defer=True) whose
        # route is still owed (its Answer is the wire's last: ``WireSelect.answer``)
        self._deferred: tuple[bytes, float, float] | None = None
        self._index = KVIndex(clock)
        # NOTE: the tinyserve policy's compiled path (no Candidates); False = the generic one.
        self.fast_path = True
        # NOTE: no Select pays for compiling
        objective_kernel.warm_up()
        access.warm_up()
        select_kernel.warm_up()
        self._table = ReplicaTable()
        self._access = AccessTracker(clock, self.config.hot_half_life_s)
        self._index.reserve_pending(self.config.pending_reserve_marks)
        # NOTE: a Select bumps ~log2(prompt blocks) checkpoints where it marks ~64 blocks
        self._access.reserve(self.config.pending_reserve_marks // 8)
        self._ranker = Ranker(self._index, self._table, self._access, clock)
        self._rewards = RewardBook(self.config.objective)  # NOTE: R(c), cluster/selector/reward.py
        self._policies: dict[str, Policy] = {}
        self._routed: OrderedDict[str, tuple[str, int]] = (
            OrderedDict()
        )  # request_id -> (policy, predicted)
        self._started = clock()
        self._counters = {
            "selects": 0,
            "events": 0,
            "unknown_replica": 0,
            "resyncs": 0,
            "feedback": 0,
        }
        self._decisions: dict[str, int] = {}
        self._metric_children: dict[str, tuple[Any, Any]] = {}
        # NOTE: the compiled bytes-in/bytes-out Select (``select_wire``); its counts reach
        # ``counters`` when read and Prometheus at each collection
        self._wire = WireSelect(self._index, self._table, self._access, self._ranker,
                                TinyServeObjective.name)  # fmt: skip
        obj = self.config.objective
        self._wire.warm_up(objective_kernel.pack_config(obj, obj.w))
        self.metrics.on_collect(self._export_tally)

    @property
    def counters(self) -> dict[str, int]:
        """Event counts by kind (selects, events, unknown_replica, resyncs, feedback),
        the compiled Selects' included; the dict is live (later counts change it)."""
        with self._lock:
            self._fold_tally()
            return self._counters

    def _fold_tally(self) -> None:
        """The compiled Selects' counts since the last fold into ``_counters`` and
        ``_decisions`` (call under the lock)."""
        selects, unknown = self._wire.tally.take_counts()
        if selects:
            self._counters["selects"] += selects
            name = self._wire.policy
            self._decisions[name] = self._decisions.get(name, 0) + selects
        self._counters["unknown_replica"] += unknown

    def _export_tally(self) -> None:
        with self._lock:
            self._wire.tally.export(self.metrics)

    # ------------------------------------------------------------------ membership
    def join(
        self, replica_id: str, node_id: str = "", block_size: int = 16, num_blocks: int = 0
    ) -> None:
        """Register or refresh a replica (idempotent; a rejoin keeps its index state)."""
        with self._lock:
            rec, created = self._table.add(replica_id, node_id, block_size, num_blocks)
            if created:
                self._index.add_slot(rec.slot)
            rec.connected = True
            rec.last_seen = self.clock()
            self.metrics.replicas.set(len(self._table))

    def touch(self, replica_id: str) -> bool:
        """Heartbeat: the replica is alive (no-op and False when unknown; not counted)."""
        with self._lock:
            rec = self._table.get(replica_id)
            if rec is not None:
                rec.last_seen = self.clock()
            return rec is not None

    def disconnect(self, replica_id: str) -> None:
        """Its stream ended; state stays until it reconnects, leaves or expires."""
        with self._lock:
            rec = self._table.get(replica_id)
            if rec is not None:
                rec.connected = False

    def leave(self, replica_id: str) -> bool:
        """Forget a replica and everything it held; False when unknown."""
        with self._lock:
            return self._leave_locked(replica_id)

    def _leave_locked(self, replica_id: str) -> bool:
        rec = self._table.remove(replica_id)
        if rec is None:
            return False
        self._index.remove_slot(rec.slot)
        self._access.forget(rec.slot)
        self._rewards.forget(replica_id)
        self.metrics.replicas.set(len(self._table))
        with contextlib.suppress(KeyError):
            self.metrics.index_blocks.remove(replica_id)
        return True

    def expire_stale(self) -> list[str]:
        """Remove replicas silent for longer than ``stale_after_s``; returns their ids."""
        with self._lock:
            now = self.clock()
            stale = [
                r.replica_id
                for r in self._table.records.values()
                if now - r.last_seen > self.config.stale_after_s
            ]
            for rid in stale:
                self._leave_locked(rid)
            self._index.expire_pending()
            return stale

    def _known(self, replica_id: str) -> ReplicaRecord | None:
        rec = self._table.get(replica_id)
        if rec is None:
            self._counters["unknown_replica"] += 1
            self.metrics.errors.labels("unknown_replica").inc()
        else:
            rec.last_seen = self.clock()
        return rec

    # ------------------------------------------------------------------ ingestion
    def apply_events(self, replica_id: str, seq: int, events: Sequence[KVEvent]) -> ApplyResult:
        """Apply one batch atomically (all or nothing). Unknown replica: ignored and counted."""
        with self._lock:
            rec = self._known(replica_id)
            if rec is None:
                return ApplyResult(False, False, -1, 0)
            if seq != rec.last_seq + 1:
                rec.synced = False
                self.metrics.errors.labels("seq_gap").inc()
                return ApplyResult(False, True, rec.last_seq, 0)
            slot, n = rec.slot, 0
            for ev in events:
                if isinstance(ev, BlockStored):
                    n += self._index.store(slot, ev.block_hashes, ev.medium)
                    self.metrics.block_events.labels("stored").inc(len(ev.block_hashes))
                elif isinstance(ev, BlockRemoved):
                    n += self._index.remove(slot, ev.block_hashes, ev.medium)
                    self._access.forget(slot, ev.block_hashes)
                    self.metrics.block_events.labels("removed").inc(len(ev.block_hashes))
                elif isinstance(ev, AllBlocksCleared):
                    self._index.clear(slot)
                    self._access.forget(slot)
                    self.metrics.block_events.labels("cleared").inc()
            rec.last_seq = seq
            self._counters["events"] += n
            self._update_index_gauges(rec)
            return ApplyResult(True, False, seq, n)

    def resync(
        self, replica_id: str, seq: int, gpu_hashes: Iterable[int], cpu_hashes: Iterable[int] = ()
    ) -> ApplyResult:
        """Replace the replica's resident set; the next batch must carry ``seq + 1``."""
        with self._lock:
            rec = self._known(replica_id)
            if rec is None:
                return ApplyResult(False, False, -1, 0)
            self._index.replace(rec.slot, gpu_hashes, cpu_hashes)
            self._access.forget(rec.slot)
            rec.last_seq, rec.synced = seq, True
            self._counters["resyncs"] += 1
            self.metrics.resyncs.inc()
            self._update_index_gauges(rec)
            return ApplyResult(True, False, seq, self._index.num_resident(rec.slot))

    def update_load(self, replica_id: str, load: LoadSnapshot) -> bool:
        with self._lock:
            rec = self._known(replica_id)
            if rec is not None:
                self._table.set_load(rec, load)
                # NOTE: R(c) fades with time; a report refreshes it even without traffic.
                self._set_reward(rec, self._rewards.value(replica_id, self.clock()))
            return rec is not None

    def _update_index_gauges(self, rec: ReplicaRecord) -> None:
        self.metrics.index_blocks.labels(rec.replica_id).set(self._index.num_resident(rec.slot))
        self.metrics.unique_blocks.set(self._index.num_unique_blocks)

    # ------------------------------------------------------------------ feedback and stats
    def _set_reward(self, rec: ReplicaRecord, r: float) -> None:
        """R(c) into the table, with the prefill rate it implies (``corrected_rate``)."""
        rate = corrected_rate(rec.load.prefill_tokens_per_s, r, self.config.objective)
        self._table.set_reward(rec, r, rate)

    def feedback(self, outcome: Outcome) -> bool:
        """Record a realised outcome (R(c) of its replica, the policy's feedback hook);
        False (counted) for an unknown replica."""
        with self._lock:
            rec = self._known(outcome.replica_id)
            if rec is None:
                return False
            r = self._rewards.observe(outcome, self.clock())
            if r is not None:
                self._set_reward(rec, r)
            self._counters["feedback"] += 1
            routed = self._routed.pop(outcome.request_id, None)
            if routed is not None:
                policy, predicted = routed
                self.metrics.predicted_hit_tokens.inc(predicted)
                self.metrics.realised_hit_tokens.inc(outcome.num_cached_tokens)
                self.policy(policy).on_feedback(outcome)
            return True

    def stats(self) -> CoreStats:
        with self._lock:
            self._fold_tally()
            tiny = self._policies.get(TinyServeObjective.name)
            w = (
                tuple(float(x) for x in tiny.w)
                if isinstance(tiny, TinyServeObjective)
                else self.config.objective.w
            )
            return CoreStats(
                len(self._table),
                self._index.num_unique_blocks,
                dict(self._counters),
                dict(self._decisions),
                self.clock() - self._started,
                self.config.default_policy,
                w,
            )

    def list_replicas(self) -> list[ReplicaStatus]:
        with self._lock:
            now = self.clock()
            return [
                ReplicaStatus(
                    r.replica_id,
                    r.node_id,
                    r.block_size,
                    self._index.num_resident(r.slot),
                    self._index.num_pending(r.slot),
                    r.synced,
                    r.connected,
                    now - r.last_seen,
                    r.last_seq,
                    r.load,
                )
                for r in sorted(self._table.records.values(), key=lambda r: r.replica_id)
            ]
