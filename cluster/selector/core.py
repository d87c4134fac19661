"""SelectorCore: the in-process selection service (index + replicas + policies), no gRPC.

The gRPC servicer, the vLLM ZMQ adapter and the discrete-event simulator all drive this one
object. Every public method takes the core's lock, so callers on different threads (the aio
loop, a ZMQ subscriber thread) are safe; each call is short. Taking the lock first makes the
route a ``select_wire(defer=True)`` still owes (``_CoreLock``): no call sees the index without
it.

Replica stream protocol (per replica): ``join`` -> ``resync(seq=S)`` -> ``apply_events(S+1)``,
``apply_events(S+2)``, ... A batch whose seq is not ``last_seq + 1`` is not applied: the result
says ``resync_required`` and the replica is marked unsynced until the next resync. A fresh
replica may skip the resync and start at seq 0 (empty cache). ``clock`` is injectable
(simulated time).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeGuard

from cluster.selector import access, objective_kernel, select_kernel
from cluster.selector.access import AccessTracker
from cluster.selector.core_types import (
    ApplyResult,
    CoreStats,
    ReplicaStatus,
    Selection,
)
from cluster.selector.core_types import (
    CoreConfig as CoreConfig,  # NOTE: re-exported: callers build the core from here
)
from cluster.selector.index import U64, KVIndex
from cluster.selector.metrics import SelectorMetrics
from cluster.selector.objective import TinyServeObjective
from cluster.selector.policy import Policy, make_policy, policy_names, policy_params
from cluster.selector.ranker import Ranker
from cluster.selector.replica_table import _FLOAT_COLS, _INT_COLS, ReplicaRecord, ReplicaTable
from cluster.selector.reward import RewardBook, corrected_rate, predict
from cluster.selector.types import LoadSnapshot, Outcome, SelectionRequest
from cluster.selector.wire import decode_select, encode_select
from cluster.selector.wire_select import Answer, WireSelect
from kvmanager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

# NOTE: the fast path's kernels read ReplicaTable columns by position; these names pin them.
assert _INT_COLS[:4] == ("block_size", "num_blocks", "num_free_blocks", "num_cached_blocks")
assert _INT_COLS[6] == "num_queued_tokens" and _FLOAT_COLS[:2] == ("ttft_ewma_s", "f_total")
assert _FLOAT_COLS[3] == "reward" and _FLOAT_COLS[4] == "prefill_tokens_per_s"
# NOTE: bounded: a backlog is drained by expire_stale(), not by one unlucky Select. A Select
# queues at most one mark, so 2 out per Select keeps up and still drains a backlog; with 8,
# the Selects after a stall paid ~8 marks (~520 deletions) each (p99.9 393 -> 321 us CPU,
# max 29 -> 3.5 ms at 5,000 Selects/s in steady state, 256 x 100k; p99 unchanged).
_SELECT_EXPIRY_MARKS = 2


class _CoreLock:
    """The core's lock. Entering it first makes the route a deferred Select still owes
    (``SelectorCore.select_wire(defer=True)``), so no holder sees the index without it."""

    __slots__ = ("_core", "_lock")

    def __init__(self, core: SelectorCore) -> None:
        self._core, self._lock = core, threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._core._deferred is not None:
            try:
                self._core._route_deferred()
            except BaseException:
                self._lock.release()
                raise

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class SelectorCore:
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
        self._lock = _CoreLock(self)
        # NOTE: (answer, now, policy) of a select_wire(defer=True) whose route is still owed
        self._deferred: tuple[Answer, float, str] | None = None
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

    # ------------------------------------------------------------------ policies
    def policy(self, name: str = "") -> Policy:
        """The (shared, stateful) policy instance by name; ValueError when unknown."""
        name = name or self.config.default_policy
        pol = self._policies.get(name)
        if pol is None:
            kwargs: dict[str, Any] = (
                {"config": self.config.objective} if name == TinyServeObjective.name else {}
            )
            if "seed" in policy_params(name):
                kwargs["seed"] = self.config.seed
            pol = make_policy(name, **kwargs)
            self._policies[name] = pol
        return pol

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

    # ------------------------------------------------------------------ selection
    def select(
        self,
        request: SelectionRequest,
        candidate_ids: Sequence[str] = (),
        policy: str = "",
        max_results: int = 0,
        speculative: bool = True,
    ) -> Selection:
        """Rank candidates (all known replicas when empty) for ``request``. Unknown candidate
        ids are ignored and counted. ValueError for an oversized prompt or an unknown policy.
        With ``speculative`` the winner gets the prompt's blocks as pending inserts and the
        request's tokens as in-flight load."""
        if len(request.block_hashes) > self.config.max_prompt_blocks:
            raise ValueError(
                f"{len(request.block_hashes)} block hashes exceed max_prompt_blocks={self.config.max_prompt_blocks}"
            )
        with self._lock:
            t0 = time.perf_counter()
            pol = self.policy(policy)
            slots, ids, unknown, mask = self._table.candidate_slots(candidate_ids)
            if unknown:
                self._counters["unknown_replica"] += unknown
                self.metrics.errors.labels("unknown_replica").inc(unknown)
            hashes: Sequence[int] | U64 = request.block_hashes
            if self._compiled(pol):
                # NOTE: the expiry, the pending marks and the access bump are made inside
                # this call
                ranked, matched, hashes = self._ranker.rank_fast(
                    request, pol, slots, ids, mask, max_results, speculative,
                    self.config.pending_ttl_s, _SELECT_EXPIRY_MARKS,
                )  # fmt: skip
                marked = True
            else:
                self._index.expire_pending(max_marks=_SELECT_EXPIRY_MARKS)
                cands = self._ranker.candidates(request, slots, ids, mask)
                ranking = pol.select(request, cands)
                ranked = ranking.top(cands, max_results)
                matched = int(cands.num_matched_blocks[ranking.order[0]]) if ranked else 0
                marked = False
            if ranked:
                self._route(request, hashes, ranked[0].replica_id, pol.name, matched,
                            speculative, marked)  # fmt: skip
            self._counters["selects"] += 1
            self._decisions[pol.name] = self._decisions.get(pol.name, 0) + 1
            decisions, latency = self._policy_metrics(pol.name)
            decisions.inc()
            latency.observe(time.perf_counter() - t0)
            return Selection(pol.name, ranked, request.num_prompt_blocks, unknown)

    def select_wire(self, raw: bytes, defer: bool = False) -> bytes:
        """``SelectResponse`` bytes for ``SelectRequest`` bytes ``raw`` (what the gRPC
        servicer's raw codec and the fast lane serve): ``wire.decode_select`` -> ``select``
        -> ``wire.encode_select``, and the same answer, state and errors (MalformedMessage,
        ValueError) as that, but the tinyserve policy's fast path runs as one compiled call
        (``wire_select``; the rest falls back to the three steps).

        ``defer``: the compiled Select answers first and owes its route (the winner's pending
        marks, access bump, in-flight record, the reward's prediction): the next holder of
        the core's lock makes it before anything else, so every later call sees the same
        state as without ``defer``; ``flush`` makes it at once (the server calls it after
        sending the answer)."""
        with self._lock:
            t0 = time.perf_counter()
            pol = self.policy(TinyServeObjective.name)
            if self._compiled(pol):
                now = self.clock()
                ans = self._wire.run(
                    raw, now, self.config.pending_ttl_s, _SELECT_EXPIRY_MARKS,
                    self.config.max_prompt_blocks, pol.packed_config(),
                    self.config.default_policy == pol.name, defer,
                )  # fmt: skip
                if ans is not None:
                    if defer:
                        self._deferred = (ans, now, pol.name)
                    else:
                        self._wire_routed(ans, now, pol.name, ans.route_stats)
                    self._wire.tally.observe(time.perf_counter() - t0)
                    return ans.body
        req, candidates, policy, k, speculative = decode_select(raw, self.config.max_prompt_blocks)
        return encode_select(self.select(req, candidates, policy, k, speculative))

    def flush(self) -> None:
        """Make a deferred Select's route now (``select_wire(defer=True)``): what a server
        runs after sending the answer, off the next Select's path.
        NOTE: no expiry here: only marks that fell due since that Select began would go, and
        the next Select's start drains those in the same compiled call."""
        with self._lock:
            return  # NOTE: entering the lock makes the owed route (``_CoreLock``)

    def _route_deferred(self) -> None:
        """The deferred Select's route, as ``select_wire`` would have made it (``_CoreLock``
        calls this on entry: nothing changed the index since that Select)."""
        assert self._deferred is not None
        ans, now, policy = self._deferred
        self._deferred = None
        st = ans.route_stats
        if ans.r and ans.speculative:
            ttl = self.config.pending_ttl_s
            st = [*self._wire.route(ans, now, now + ttl if ttl > 0 else math.nan), *st[4:]]
        self._wire_routed(ans, now, policy, st)

    def _wire_routed(self, ans: Answer, now: float, policy: str, st: list[int]) -> None:
        """The book-keeping ``rank_fast`` and ``_route`` do after their compiled call, for
        a compiled wire Select (``st``: its ``select_kernel.ROUTE_STATS``)."""
        self._index.routed(st[0], st[1], st[4], st[5])
        if not ans.r:
            return
        rec = self._table.by_slot[ans.winner_slot]
        if ans.speculative:
            self._access.bumped(st[2], st[3], now)
            self._table.add_inflight_record(rec, ans.num_prompt_tokens + ans.num_output_tokens)
        if ans.request_id:
            self._remember(ans.request_id, ans.num_prompt_tokens, rec, ans.matched, policy)

    def _compiled(self, pol: Policy) -> TypeGuard[TinyServeObjective]:
        """Whether ``pol`` ranks in the compiled kernels (``select_kernel``): the tinyserve
        objective, not learning, with ``fast_path`` on."""
        return self.fast_path and isinstance(pol, TinyServeObjective) and not pol.config.learn

    def _policy_metrics(self, name: str) -> tuple[Any, Any]:
        children = self._metric_children.get(name)
        if children is None:
            children = (
                self.metrics.decisions.labels(name),
                self.metrics.select_latency.labels(name),
            )
            self._metric_children[name] = children
        return children

    def _route(
        self,
        request: SelectionRequest,
        hashes: Sequence[int] | U64,
        replica_id: str,
        policy: str,
        matched: int,
        speculative: bool,
        marked: bool,
    ) -> None:
        """The winner's share of the request: pending marks, access bump and the table's
        in-flight load (unless the compiled call ``marked`` them already), the record's
        in-flight tokens, the reward's prediction."""
        rec = self._table.records[replica_id]
        if speculative:
            if not marked:
                # NOTE: the matched prefix is resident already; only the rest needs a mark.
                self._index.mark_pending(rec.slot, hashes[matched:], self.config.pending_ttl_s)
                self._access.bump(rec.slot, hashes)
            tokens = request.num_prompt_tokens + request.num_output_tokens
            if marked:  # NOTE: the compiled call added the columns' in-flight load
                self._table.add_inflight_record(rec, tokens)
            else:
                self._table.add_inflight(rec, tokens)
        if request.request_id:
            self._remember(request.request_id, request.num_prompt_tokens, rec, matched, policy)

    # ------------------------------------------------------------------ feedback and stats
    def _remember(
        self, request_id: str, num_prompt_tokens: int, rec: ReplicaRecord, matched: int,
        policy: str,
    ) -> None:  # fmt: skip
        """A routed request, for its feedback: the objective's prediction for it on ``rec``
        (cluster/selector/reward.py) and (policy, predicted hit tokens)."""
        self._rewards.expect(
            request_id,
            predict(
                rec.replica_id,
                num_prompt_tokens,
                matched * rec.block_size,
                # NOTE: the REPORTED rate, not the column R may have corrected: R measures
                # realised TTFT against the reports (a corrected prediction would cancel it).
                rec.load.prefill_tokens_per_s,
                self.config.objective,
            ),
        )
        self._routed[request_id] = (policy, matched * rec.block_size)
        if len(self._routed) > 65536:
            self._routed.popitem(last=False)

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
