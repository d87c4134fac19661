"""The selection half of ``SelectorCore``: its policies, ranking one request (``select``, the
Python path; ``select_wire``, one compiled call from request bytes to answer bytes) and the
route of the winner (pending marks, access bump, in-flight load, the reward's prediction),
made inline or owed until the answer is out (``defer``, ``flush``, ``CoreLock``).

Contract: a mixin of ``SelectorCore`` (core.py), which builds the state declared below;
every public method here takes the core's lock itself, as the core's own do.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

from cluster.selector.access import AccessTracker
from cluster.selector.core_types import CoreConfig, Selection
from cluster.selector.index import U64, KVIndex
from cluster.selector.metrics import SelectorMetrics
from cluster.selector.objective import TinyServeObjective
from cluster.selector.policy import Policy, make_policy, policy_params
from cluster.selector.ranker import Ranker
from cluster.selector.replica_table import ReplicaRecord, ReplicaTable
from cluster.selector.reward import RewardBook, predict
from cluster.selector.types import SelectionRequest
from cluster.selector.wire import decode_select, encode_select
from cluster.selector.wire_select import Answer, WireSelect

# NOTE: bounded: a backlog is drained by expire_stale(), not by one unlucky Select. A Select
# queues at most one mark, so 2 out per Select keeps up and still drains a backlog; with 8,
# the Selects after a stall paid ~8 marks (~520 deletions) each (p99.9 393 -> 321 us CPU,
# max 29 -> 3.5 ms at 5,000 Selects/s in steady state, 256 x 100k; p99 unchanged).
_SELECT_EXPIRY_MARKS = 2
_TINYSERVE = TinyServeObjective.name


class CoreLock:
    """The core's lock. Entering it first makes the route a deferred Select still owes
    (``SelectorCore.select_wire(defer=True)``), so no holder sees the index without it."""

    __slots__ = ("_core", "_lock")

    def __init__(self, core: CoreSelection) -> None:
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


class CoreSelection:
    """Policies, ranking and routing over the state ``SelectorCore`` builds (declared here)."""

    config: CoreConfig
    clock: Callable[[], float]
    metrics: SelectorMetrics
    fast_path: bool
    _lock: CoreLock
    _deferred: tuple[bytes, float, float] | None
    _index: KVIndex
    _table: ReplicaTable
    _access: AccessTracker
    _ranker: Ranker
    _rewards: RewardBook
    _policies: dict[str, Policy]
    _routed: OrderedDict[str, tuple[str, int]]
    _counters: dict[str, int]
    _decisions: dict[str, int]
    _metric_children: dict[str, tuple[Any, Any]]
    _wire: WireSelect

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

        ``defer``: the compiled Select answers first and owes its route (the bounded expiry
        of due marks, the winner's pending marks, access bump, in-flight record, the reward's
        prediction): the next holder of the core's lock makes it before anything else, so
        every later call sees the same state as without ``defer``; ``flush`` makes it at once
        (the server calls it after sending the answer)."""
        with self._lock:
            t0 = time.perf_counter()
            pol = self._policies.get(_TINYSERVE) or self.policy(_TINYSERVE)
            if self._compiled(pol):
                now = self.clock()
                # NOTE: deferred, the expiry of due marks goes after the answer too (the walk
                # does not count a due mark, expired or not: same answer).
                body = self._wire.run(
                    raw, now, self.config.pending_ttl_s, 0 if defer else _SELECT_EXPIRY_MARKS,
                    self.config.max_prompt_blocks, pol.packed_config(),
                    self.config.default_policy == _TINYSERVE, defer,
                )  # fmt: skip
                if body is not None:
                    if defer:
                        self._deferred = (raw, now, time.perf_counter() - t0)
                    else:
                        ans = self._wire.answer(raw)
                        self._wire_routed(ans, now, ans.route_stats)
                        self._wire.tally.observe(time.perf_counter() - t0)
                    return body
        req, candidates, policy, k, speculative = decode_select(raw, self.config.max_prompt_blocks)
        return encode_select(self.select(req, candidates, policy, k, speculative))

    def flush(self) -> None:
        """Make a deferred Select's route now (``select_wire(defer=True)``): what a server
        runs after sending the answer, off the next Select's path.
        NOTE: the route's expiry is that Select's own (marks due by its start, bounded);
        marks due since go at the next Select's, as without ``defer``."""
        with self._lock:
            return  # NOTE: entering the lock makes the owed route (``CoreLock``)

    def _route_deferred(self) -> None:
        """The deferred Select's route, as ``select_wire`` would have made it (``CoreLock``
        calls this on entry: nothing changed the index since that Select)."""
        assert self._deferred is not None
        raw, now, elapsed = self._deferred
        self._deferred = None
        ans = self._wire.answer(raw)
        st = ans.route_stats
        if ans.r and ans.speculative:
            ttl = self.config.pending_ttl_s
            st = self._wire.route(ans, now, now + ttl if ttl > 0 else math.nan,
                                  _SELECT_EXPIRY_MARKS)  # fmt: skip
        else:
            self._index.expire_pending(_SELECT_EXPIRY_MARKS, now)
        self._wire_routed(ans, now, st)
        self._wire.tally.observe(elapsed)

    def _wire_routed(self, ans: Answer, now: float, st: list[int]) -> None:
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
            self._remember(ans.request_id, ans.num_prompt_tokens, rec, ans.matched, _TINYSERVE)

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
