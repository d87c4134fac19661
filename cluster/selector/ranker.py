"""Ranker: the candidates' columns and the tinyserve policy's compiled ranking, for SelectorCore.

Two paths to the same answer (tests/cluster/test_selector_core.py compares them):
- ``candidates``: the columnar ``Candidates`` any policy ranks (index match, hotness, node
  locality, the replica table's load columns);
- ``rank_fast``: the TinyServe objective without ``Candidates``, one compiled call from the
  hashes to the ranked rows and the winner's speculative insert
  (``select_kernel.select_bound``), its arrays and buffers bound once per
  ``generation.Generation`` and passed as one cached tuple.
Contract: not thread-safe; SelectorCore calls it holding its lock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from cluster.selector import index_kernels, select_kernel
from cluster.selector.access import AccessTracker
from cluster.selector.generation import Generation
from cluster.selector.index import U64, KVIndex, as_hash_array
from cluster.selector.objective import TinyServeObjective
from cluster.selector.replica_table import ReplicaTable
from cluster.selector.types import Candidates, Ranked, ScoreTerms, SelectionRequest


class Ranker:
    """Reads the core's index, replica table and access counts; owns only its buffers."""

    def __init__(
        self, index: KVIndex, table: ReplicaTable, access: AccessTracker,
        clock: Callable[[], float],
    ) -> None:  # fmt: skip
        self._index, self._table, self._access, self._clock = index, table, access, clock
        # NOTE: the fast path's reused buffers (grown on demand)
        self._match = np.zeros((3, 64), np.int64)
        self._top = np.zeros(0, np.int64)
        self._result = np.zeros((0, len(select_kernel.RESULT_COLS) + 1))
        self._cand_cache: tuple[int, U64] | None = None
        self._stats = np.zeros(len(select_kernel.ROUTE_STATS), np.int64)
        # NOTE: ``select_bound``'s arrays, re-read when an owner replaced one (generation.py)
        self._bound: tuple[Any, ...] = ()
        self._bound_gen = -1

    def rank_fast(
        self,
        request: SelectionRequest,
        pol: TinyServeObjective,
        slots: np.ndarray,
        ids: list[str],
        mask: int,
        k: int,
        speculative: bool = False,
        ttl_s: float = 0.0,
        max_expire: int = 0,
    ) -> tuple[list[Ranked], int, U64]:
        """(best ``k`` rows, the winner's matched blocks, the hashes as uint64 for the route).
        First drops up to ``max_expire`` due pending marks (``KVIndex.expire_pending``). With
        ``speculative``, the winner's pending marks (for ``ttl_s``) and its access bump are
        made in the same compiled call (``select_kernel.select_bound``); the rest of the
        route (in-flight load, the reward's prediction) is the caller's."""
        hashes = as_hash_array(request.block_hashes)
        nh = len(hashes) if speculative else 0
        # NOTE: reservations first: growing a table replaces its arrays (a new generation)
        self._index.reserve_route(nh)
        if speculative:
            self._access.reserve(max(nh, 1).bit_length())
        bound = self.bound_for(len(slots))
        cfg, q = pol.kernel_scalars(request)
        now = self._clock()
        use_cpu, use_pending = self._index.tiers_in_use()
        r, created, rows, acc_created, acc_reused, expired, expired_rows = (
            select_kernel.select_bound(
                hashes, self._cand_words(mask), slots,
                self._table.node_code(request.origin_node_id), request.num_prompt_tokens,
                request.num_output_tokens, q, k, now, now + ttl_s if ttl_s > 0 else math.nan,
                use_cpu, use_pending, speculative, False, max_expire, cfg, *bound,
            )
        )  # fmt: skip
        ranked = [
            Ranked(ids[int(x[14])], x[13], ScoreTerms(x[0], x[1], x[2], x[3], x[4], x[5], x[6],
                                                      x[7], x[8], x[9], x[10], int(x[11]),
                                                      int(x[12])))
            for x in self._result[:r].tolist()
        ]  # fmt: skip
        self._index.routed(created, rows, expired, expired_rows)
        if speculative and ranked:
            self._access.bumped(acc_created, acc_reused, now)
        return ranked, ranked[0].terms.num_matched_blocks if ranked else 0, hashes

    def bound_for(self, num_candidates: int) -> tuple[Any, ...]:
        """``select_bound``'s arrays (``BOUND_ARGS``) with room for ``num_candidates`` rows,
        valid while ``Generation.value`` stays the same (the buffers among them are scratch
        of one call: a caller may keep an older binding's)."""
        if self._bound_gen != Generation.value or num_candidates > len(self._top):
            self._bind(num_candidates)
        return self._bound

    def _bind(self, num_candidates: int) -> None:
        """(Re)read the arrays ``select_bound`` takes after its per-call arguments
        (``select_kernel.BOUND_ARGS``), growing this ranker's buffers first."""
        words = self._index.num_words
        if self._match.shape[1] < 64 * words:
            self._match = np.zeros((3, 64 * words), np.int64)
        if len(self._top) < num_candidates:
            self._top = np.zeros(num_candidates, np.int64)
            self._result = np.zeros((num_candidates, len(select_kernel.RESULT_COLS) + 1))
        self._bound = self.bound_now()
        assert len(self._bound) == len(select_kernel.BOUND_ARGS)
        self._cand_cache = None  # NOTE: the mask words' length may have changed
        self._bound_gen = Generation.value

    def bound_now(self) -> tuple[Any, ...]:
        """The binding as ``_bind`` would make it now (tests compare it with the cached one)."""
        tables = self._index.bound_arrays()
        acc, t = self._access, self._table
        return (
            *tables[:10], acc.keys, acc.slots, acc.vt, acc.bits, acc.rate,
            t.ints, t.floats, t.node_of_slot, *tables[10:],
            self._match, self._result, self._top, self._stats, index_kernels.SINK,
        )  # fmt: skip

    def _cand_words(self, mask: int) -> U64:
        """The walk's candidate words of ``mask``, cached for the last mask (the live set;
        ``_bind`` drops the cache when the index widens)."""
        cached = self._cand_cache
        if cached is None or cached[0] != mask:
            cached = self._cand_cache = (mask, self._index.mask_words(mask))
        return cached[1]

    def candidates(
        self, request: SelectionRequest, slots: np.ndarray, ids: list[str], mask: int
    ) -> Candidates:
        """The columns every policy ranks, for the candidates at ``slots``."""
        match = self._index.match(request.block_hashes, mask)
        matched, pending, host = match.arrays(self._table.capacity)
        hot = self._access.hotness(request.block_hashes, matched, match.lengths())
        c = self._table.gather(slots)
        return Candidates(
            ids,
            matched[slots],
            pending[slots],
            host[slots],
            hot[slots],
            same_node=self._same_node(request, slots),
            **c,
        )

    def _same_node(self, request: SelectionRequest, slots: np.ndarray) -> np.ndarray:
        if not request.origin_node_id:
            return np.zeros(len(slots), np.bool_)
        nodes = [self._table.by_slot[s].node_id for s in slots.tolist()]
        return np.asarray([n == request.origin_node_id for n in nodes], np.bool_)
