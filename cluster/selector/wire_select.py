"""WireSelect: the compiled bytes-in/bytes-out Select (``wire_select_kernel``) and its binding.

It owns the kernel's scratch, the answer buffer, the ids as bytes (``wire_ids``) and the
counts (``select_tally``), and binds them with the ``Ranker``'s arrays into one tuple, re-read
when ``generation.Generation`` moved (a table grew, a replica joined or left) or a request
needs bigger buffers. ``run`` makes the call; the core does the Python-side book-keeping
with what it reports (``Answer``).

Contract: not thread-safe; SelectorCore calls it holding its lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from cluster.selector import select_kernel
from cluster.selector import wire_select_kernel as wk
from cluster.selector.access import AccessTracker
from cluster.selector.convert import MAX_CANDIDATES
from cluster.selector.generation import Generation
from cluster.selector.index import KVIndex
from cluster.selector.ranker import Ranker
from cluster.selector.replica_table import ReplicaTable
from cluster.selector.select_tally import SelectTally
from cluster.selector.wire import _NUM_FIELDS
from cluster.selector.wire_ids import WireIds

_I = {name: i for i, name in enumerate(wk.INFO)}
_OUT_LEN = _I["out_len"]
assert [_I[n] for n in ("status", "r", "winner_slot", "matched", "unknown", "out_len")] == [
    0, 1, 2, 3, 4, 5] and wk.INFO[6:12] == ("deadlines_created", "pending_rows_created",
    "access_created", "access_reused", "expired_pairs", "expired_rows")  # fmt: skip

# ``select_kernel.route``'s arrays after its per-call arguments (from ``BOUND_ARGS``)
_ROUTE_ARGS = ("pend", "pover", "postate", "pbits", "acc_keys", "acc_slots", "acc_vt",
               "acc_bits", "rate", "dl_keys", "dl_slots", "dl_dl", "dl_bits", "q_dl", "q_meta",
               "q_ring", "q_state", "num_pending", "stats", "sink")  # fmt: skip


class Answer(NamedTuple):
    """What ``answer`` reports after ``run``: the book-keeping the core still owes."""

    r: int
    winner_slot: int
    matched: int
    route_stats: list[int]  # ``select_kernel.ROUTE_STATS``
    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    speculative: bool
    num_hashes: int


class WireSelect:
    """The fused Select of one core (see the module docstring)."""

    def __init__(
        self, index: KVIndex, table: ReplicaTable, access: AccessTracker, ranker: Ranker,
        policy: str,
    ) -> None:  # fmt: skip
        self._index, self._table, self._access, self._ranker = index, table, access, ranker
        self.policy = policy
        self._policy_bytes = np.frombuffer(policy.encode(), np.uint8).copy()
        self.tally = SelectTally(policy)
        self._fields = np.zeros(_NUM_FIELDS, np.int64)
        self._cands = np.zeros(2 * MAX_CANDIDATES, np.int64)
        self._info = np.zeros(len(wk.INFO), np.int64)
        self._out = np.zeros(4096, np.uint8)
        self._out_view = self._out.data
        self._deferred = np.zeros(64, np.uint64)  # NOTE: a deferred route's hashes
        self._binding: wk.Binding | None = None
        self._route_args: tuple[Any, ...] = ()
        self._route_stats = np.zeros(0, np.int64)  # NOTE: the ``stats`` among them
        self._bound_gen = -1
        self._num_candidates = 0
        # NOTE: the compiled overload's own entry point for bytes requests, found after the
        # first dispatch of a binding: numba's dispatch types every argument on each call
        # (~0.9 us, most of it the Binding's Python-level typeof); the entry unboxes only
        self._entry: Callable[..., int] | None = None

    def run(
        self, raw: bytes, now: float, ttl_s: float, max_expire: int, max_prompt_blocks: int,
        cfg: Any, default_policy: bool, defer: bool = False,
    ) -> bytes | None:  # fmt: skip
        """The answer's bytes for the Select of ``raw`` under the policy, or None (nothing
        changed) when the kernel does not cover it (``wire_select_kernel``: the caller takes
        the Python path); ``answer`` then reports the book-keeping the core still owes. With
        ``defer`` a speculative winner's pending marks and access bump are left for ``route``,
        which the caller must make before anything else reads or changes the index."""
        # NOTE: the speculative mark has at most one hash per byte of the request; room
        # for it first (a reservation may replace arrays: a new generation), in ``route``
        # when deferred (this call then adds nothing to the tables).
        nh = min(len(raw), max_prompt_blocks)
        if not defer:
            self._reserve(nh)
        elif len(self._deferred) < nh:
            self._deferred = np.zeros(2 * nh, np.uint64)
            self._bound_gen = -1
        while True:
            if self._bound_gen != Generation.value:
                self._bind()
            use_cpu, use_pending = self._index.tiers_in_use()
            args = (raw, now, ttl_s, use_cpu, use_pending, max_expire, max_prompt_blocks, cfg,
                    self._policy_bytes, default_policy, defer, self._binding)  # fmt: skip
            if self._entry is not None and type(raw) is bytes:
                status = self._entry(*args)
            else:
                status = wk.select_wire_bound(*args)
                if type(raw) is bytes:
                    self._entry = _entry_point(args)
            if status == wk.OK:
                # NOTE: only the bytes before the answer goes out; ``answer`` reads the rest
                # of ``_info`` later (deferred: in the flush), ~1 us off the answer
                return self._out_view[: self._info.item(_OUT_LEN)].tobytes()
            if status == wk.FALLBACK:
                return None
            self._grow(int(self._info[_I["num_candidates"]]))

    def answer(self, raw: bytes) -> Answer:
        """What the last ``run`` that returned bytes (for ``raw``) reports; valid until the
        next ``run``."""
        info = self._info.tolist()
        rid_at, rid_len = info[_I["request_id_at"]], info[_I["request_id_len"]]
        return Answer(
            info[1], info[2], info[3], info[6:12],
            raw[rid_at : rid_at + rid_len].decode() if rid_len else "",
            info[_I["num_prompt_tokens"]], info[_I["num_output_tokens"]],
            info[_I["speculative"]] == 1, info[_I["num_hashes"]],
        )  # fmt: skip

    def route(self, ans: Answer, now: float, deadline: float, max_expire: int = 0) -> list[int]:
        """The route ``run(defer=True)`` left for later, as it would have made it then
        (``select_kernel.route``, the index and access tables as they are now: the caller
        changed nothing in between), after the bounded expiry that ``run`` left out
        (``max_expire`` marks due by ``now``); returns its ``ROUTE_STATS``."""
        self._reserve(ans.num_hashes)
        if self._bound_gen != Generation.value:
            self._bind()
        stats = self._route_stats
        stats[:] = 0
        select_kernel.route(self._deferred[: ans.num_hashes], ans.winner_slot, ans.matched, now,
                            deadline, max_expire, *self._route_args)  # fmt: skip
        return [int(x) for x in stats[:6]]

    def _reserve(self, num_hashes: int) -> None:
        """Room for one route of ``num_hashes`` (its pending marks, its access bump)."""
        self._index.reserve_route(num_hashes)
        self._access.reserve(max(num_hashes, 1).bit_length())

    def warm_up(self, cfg: Any) -> None:
        """Compile (or load from numba's cache) the kernel: one call on bytes it refuses
        (nothing changes but reservations for one hash)."""
        refused = self.run(b"\x00", 0.0, 0.0, 0, 1, cfg, True)
        assert refused is None

    def _grow(self, num_candidates: int) -> None:
        """Room for ``num_candidates`` ranked rows (the ranker's buffers, the answer)."""
        self._num_candidates = max(self._num_candidates, num_candidates)
        self._bound_gen = -1

    def _bind(self) -> None:
        ids = WireIds.build(self._table)
        slots, _ = self._table.live()
        n = max(self._num_candidates, len(slots))
        need = 64 + len(self._policy_bytes) + n * (ids.max_field + wk.ROW_BYTES)
        if len(self._out) < need:
            self._out = np.zeros(2 * need, np.uint8)
            self._out_view = self._out.data
        ranked = self._ranker.bound_for(n)
        bound = (
            self._fields, self._cands, slots, self._index.mask_words(self._table.live_mask),
            ids.id_flat, ids.id_at, ids.id_tab, ids.node_flat, ids.node_at, ids.node_tab,
            ids.max_field, self._out, self._info, self.tally.counts, self._deferred, *ranked,
        )  # fmt: skip
        self._binding = wk.Binding(*bound)  # type: ignore[no-untyped-call]
        b = dict(zip(wk.BINDING, bound, strict=True))
        self._route_args = tuple(b[name] for name in _ROUTE_ARGS)
        self._route_stats = b["stats"]
        self._bound_gen = Generation.value
        self._entry = None


def _entry_point(
    args: tuple[Any, ...], disp: Any = wk.select_wire_bound
) -> Callable[..., int] | None:
    """The entry point of ``select_wire_bound``'s overload for the numba types of ``args``
    (what its dispatcher picks for them), or None. NOTE: calling it skips the dispatcher's
    typing: only for arguments of those types (a Binding of the same fields' types, bytes,
    a float64 config array), which ``run`` keeps: a new Binding drops it. ``disp`` is bound
    at import, so a profiler's wrapper on the module's name does not hide the dispatcher."""
    cres = disp.overloads.get(tuple(disp.typeof_pyval(a) for a in args))
    return None if cres is None else cres.entry_point

