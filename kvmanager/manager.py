"""The TinyServe KV block pool: the engine-facing API of a replica's KV cache.

Every block is in exactly one state:

    empty      ref_cnt == 0, no block_hash      -> in FreeRuns (allocatable at once)
    evictable  ref_cnt == 0, cached block_hash  -> in the eviction policy (reusable by prefix
                                                   hit, or evicted to empty on demand)
    used       ref_cnt >= 1                     -> in one or more requests' block tables
                                                   (shared prefix blocks have ref_cnt > 1)

Request life cycle (engine side):

    hit = mgr.lookup_prefix(tokens)                       # read-only
    new = mgr.allocate_slots(rid, tokens, n, prefix=hit)  # None -> not now, nothing changed
    ... forward pass writes K/V through mgr.slot_mapping(rid, start, end) ...
    mgr.commit(rid, tokens, num_computed_tokens)          # full blocks get hashed + cached
    mgr.free(rid)                                         # cached blocks stay reusable

All methods are synchronous and O(blocks touched · log num_blocks); the pool is owned by one
engine thread. Block ids in ``block_table`` stay valid until ``free`` or ``apply_compaction``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from kvmanager.allocator import BlockAllocator
from kvmanager.compaction import (
    CompactionPlan,
    apply_moves,
    num_runs,
    plan_contiguous,
    plan_moves,
)
from kvmanager.config import PoolConfig
from kvmanager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvmanager.eviction import make_eviction_policy
from kvmanager.fragmentation import AccessEpochs, LevelLatencies
from kvmanager.free_runs import FreeRuns
from kvmanager.hashing import NativeHash, make_hasher
from kvmanager.metrics import PoolStats, pool_stats
from kvmanager.request_state import PrefixHit, RequestState, register


class KVCacheManager:
    """Fixed pool of ``num_blocks`` blocks of ``block_size`` tokens with prefix reuse."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.num_blocks = config.num_blocks
        self.block_size = config.block_size
        self.hasher = make_hasher(config.hash_mode, config.hash_seed)
        self._ref_cnt = [0] * config.num_blocks
        self._block_hash: list[int | None] = [None] * config.num_blocks
        self._parent_hash: list[int | None] = [None] * config.num_blocks
        self._num_children: Counter[int] = Counter()  # cached children per parent block_hash
        self._hash_to_block: dict[int, int] = {}
        self._free = FreeRuns(config.num_blocks)
        self._alloc = BlockAllocator(self._free, config.allocator)
        self._evictable = make_eviction_policy(config.eviction, config.adaptive_half_life)
        self._requests: dict[str, RequestState] = {}
        self._events: list[KVEvent] = []
        self._clock = 0
        self._epochs = AccessEpochs(config.epoch_ops, config.num_epochs)
        self._levels = LevelLatencies()
        self._prefix_hit_tokens = 0
        self._prefix_query_tokens = 0
        self._num_evicted = 0
        self._num_compactions = 0
        self._num_split_allocations = 0
        self._num_blocks_moved = 0

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could obtain: empty (incl. reserved) + evictable cached."""
        return self._alloc.num_empty + len(self._evictable)

    @property
    def num_split_allocations(self) -> int:
        """Allocations that started a new run of a request's private blocks (running total)."""
        return self._num_split_allocations

    @property
    def num_reserved_blocks(self) -> int:
        """Empty blocks set aside as growth room of running requests (part of the free ones)."""
        return self._alloc.num_reserved

    def cached_block_hashes(self) -> list[int]:
        """Every resident cached block hash (external form): a full resync for the service."""
        return list(self._hash_to_block)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def block_table(self, request_id: str) -> list[int]:
        return list(self._get(request_id).block_ids)

    def num_computed_tokens(self, request_id: str) -> int:
        return self._get(request_id).num_computed_tokens

    def slot_mapping(self, request_id: str, start: int, end: int) -> list[int]:
        """Cache slots (block_id * block_size + offset) of token positions [start, end)."""
        req = self._get(request_id)
        bs = self.block_size
        if not 0 <= start <= end <= len(req.block_ids) * bs:
            raise ValueError(
                f"positions [{start}, {end}) outside the {len(req.block_ids) * bs} allocated "
                f"slots of request {request_id!r}"
            )
        return [req.block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def lookup_prefix(
        self, token_ids: Sequence[int], extra_keys: tuple[Any, ...] | None = None
    ) -> PrefixHit:
        """Longest run of leading full blocks whose chained hash is cached. Read-only. At most
        ``(len(token_ids) - 1) // block_size`` blocks, so one token is always left to compute
        (the engine needs its logits)."""
        hit = PrefixHit()
        if not self.config.enable_prefix_caching:
            return hit
        bs = self.block_size
        parent: NativeHash | None = None
        hash_block, external = self.hasher.hash_block, self.hasher.external
        for i in range((len(token_ids) - 1) // bs):
            native = hash_block(parent, token_ids[i * bs : (i + 1) * bs], extra_keys)
            ext = external(native)
            block_id = self._hash_to_block.get(ext)
            if block_id is None:
                break
            hit.block_ids.append(block_id)
            hit.block_hashes.append(ext)
            parent = native
        hit.num_cached_tokens = len(hit.block_ids) * bs
        hit.parent_native = parent
        return hit

    # -- mutation ----------------------------------------------------------------------------
    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_new_tokens: int,
        prefix: PrefixHit | None = None,
        *,
        extra_keys: tuple[Any, ...] | None = None,
        expected_num_tokens: int | None = None,
    ) -> list[int] | None:
        """Grow ``request_id``'s block table to cover num_computed_tokens + num_new_tokens.
        The first call registers the request, takes a reference on every block of ``prefix``
        (re-validated: a stale hit is looked up again) and starts at the hit's cached tokens.
        ``expected_num_tokens`` (prompt + max_tokens) lets best fit reserve room to grow in
        place. Returns the new block ids (maybe empty), or None when the pool cannot supply
        them even after eviction; then nothing has changed."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        req = self._requests.get(request_id)
        bs = self.block_size
        if req is not None and req.num_computed_tokens + num_new_tokens <= len(req.block_ids) * bs:
            # NOTE: the common decode step (the token fits the last block): the full path below
            # would reach the same result, at ~10x the host cost per request and step.
            self._tick()
            return []
        hit = self._validated(prefix, token_ids, extra_keys) if req is None else PrefixHit()
        num_computed = hit.num_cached_tokens if req is None else req.num_computed_tokens
        num_held = len(hit.block_ids) if req is None else len(req.block_ids)
        need = max(0, -(-(num_computed + num_new_tokens) // bs) - num_held)
        revived = sum(1 for b in hit.block_ids if self._ref_cnt[b] == 0)
        if need > self._alloc.num_empty + len(self._evictable) - revived:
            return None
        self._tick()
        if req is None:
            req = register(self, request_id, token_ids, hit, extra_keys, expected_num_tokens)
        last = req.block_ids[-1] if req.block_ids else None
        want = None
        if req.expected_num_tokens is not None:
            want = -(-req.expected_num_tokens // bs) - len(req.block_ids)
        shortfall = need - self._alloc.num_empty
        if want is not None and need and self.config.allocator == "best_fit":
            # NOTE: a new extent needs `want` contiguous empty blocks. When free runs are too
            # short, evict up to that many cold blocks at once: leaves-first eviction walks a
            # released chain backwards over contiguous ids, so this frees a run, not scattered
            # single blocks (what block-at-a-time eviction for decode would leave).
            reserved = self._alloc.reserved.get(request_id, (0, 0))[1]
            in_place = self._free.run_at(last + 1) if last is not None else 0
            if reserved + in_place < need and self._free.largest() < want:
                shortfall = max(shortfall, min(want - self._free.largest(), len(self._evictable)))
        if shortfall > 0:
            self._evict(shortfall)
        new_ids = self._alloc.allocate(request_id, need, last, want)
        # NOTE: a new run of the request's own blocks: what compaction gathers again.
        self._num_split_allocations += req.splits(len(req.block_ids), new_ids)
        for b in new_ids:
            self._ref_cnt[b] = 1
        req.block_ids += new_ids
        self._epochs.record(new_ids)
        return new_ids

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Record that tokens[:num_computed_tokens] now hold K/V. Blocks that became full are
        hashed; the first block per hash is cached (``BlockStored``), a duplicate of an
        already cached hash stays private and returns to empty on free.

        ``token_ids`` may be shorter (asynchronous scheduling: a token still on the device):
        blocks not fully given are hashed by a later commit that brings their tokens."""
        req = self._get(request_id)
        bs = self.block_size
        if not req.num_computed_tokens <= num_computed_tokens <= len(req.block_ids) * bs:
            raise ValueError(
                f"num_computed_tokens {num_computed_tokens} must lie in "
                f"[{req.num_computed_tokens}, {len(req.block_ids) * bs}] for {request_id!r}"
            )
        req.num_computed_tokens = num_computed_tokens
        if not self.config.enable_prefix_caching:
            return
        self._tick()
        num_known = min(num_computed_tokens, len(token_ids))
        if num_known // bs <= req.num_hashed_blocks:
            return  # NOTE: no block became full (most decode steps): nothing to hash
        stored: BlockStored | None = None
        hash_block, external = self.hasher.hash_block, self.hasher.external
        # NOTE: each block's external hash is the next one's parent_ext (computed once).
        ext = None if req.last_native is None else external(req.last_native)
        for i in range(req.num_hashed_blocks, num_known // bs):
            parent_ext, chunk = ext, list(token_ids[i * bs : (i + 1) * bs])
            req.last_native = hash_block(req.last_native, chunk, req.extra_keys)
            ext = external(req.last_native)
            block_id = req.block_ids[i]
            if ext in self._hash_to_block:  # a duplicate ends the current event batch
                if stored is not None:
                    self._events.append(stored)
                stored = None
                continue
            self._hash_to_block[ext] = block_id
            self._block_hash[block_id] = ext
            self._parent_hash[block_id] = parent_ext
            if parent_ext is not None:
                self._num_children[parent_ext] += 1
            self._evictable.touch(block_id, self._clock, i)
            if stored is None:
                stored = BlockStored([], parent_ext, [], bs)
            stored.block_hashes.append(ext)
            stored.token_ids.extend(chunk)
        req.num_hashed_blocks = max(req.num_hashed_blocks, num_known // bs)
        if stored is not None:
            self._events.append(stored)

    def free(self, request_id: str) -> None:
        """Release a request's references, tail first (so chain leaves are evicted first).
        Raises KeyError for an unknown (or already freed) request, changing nothing."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise KeyError(f"unknown request {request_id!r} (never allocated or already freed)")
        self._tick()
        self._alloc.release(request_id)
        ref_cnt, block_hash = self._ref_cnt, self._block_hash
        emptied: list[int] = []
        for b in reversed(req.block_ids):
            ref_cnt[b] -= 1
            assert ref_cnt[b] >= 0, f"negative ref_cnt on block {b}"
            if ref_cnt[b] == 0:
                if block_hash[b] is None:
                    emptied.append(b)
                else:
                    self._evictable.add(b, self._clock)
        self._free.put_many(emptied)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (``AllBlocksCleared``). Refused (False) while any block is
        in use, as in vLLM, since used blocks' hashes cannot be withdrawn safely."""
        if self._alloc.num_empty + len(self._evictable) != self.num_blocks:
            return False
        while len(self._evictable):
            self._drop_hash(self._evictable.pop(lambda _b: True))
        self._events.append(AllBlocksCleared())
        return True

    def observe_latency(self, level: str, seconds: float) -> None:
        """Record a latency served by cache ``level`` ('device' or 'recompute'): F_access."""
        if level not in self._levels.latencies:
            raise ValueError(f"unknown cache level {level!r}; expected one of {LevelLatencies.LEVELS}")
        self._levels.latencies[level].append(seconds)

    def take_events(self) -> list[KVEvent]:
        """Drain and return the events since the last call, in order."""
        events, self._events = self._events, []
        return events

    # -- compaction (kvmanager.compaction) -------------------------------------------------------
    def plan_compaction(self) -> list[tuple[int, int]]:
        """``pack``: fewest (src, dst) moves that leave free space as one run at the top.
        Releases all growth reservations first (they are empty space to the plan)."""
        self._alloc.release_all()
        return plan_moves(self._free, self.num_blocks)

    def plan_contiguous_compaction(
        self, keep_free: int = 0, full_layout_after: int = 1
    ) -> CompactionPlan:
        """``contiguous``: each split private tail (with its growth room) into one run; the
        whole pool laid out once ``full_layout_after`` tails (0: never) find no window."""
        reserved = dict(self._alloc.reserved)
        self._alloc.release_all()
        return plan_contiguous(self, reserved, keep_free, full_layout_after)

    def apply_compaction(
        self, plan: CompactionPlan | Sequence[tuple[int, int]], kv_caches: Sequence[torch.Tensor] = ()
    ) -> dict[int, int]:
        """Execute a plan in one step (``kvmanager.compaction.apply_moves``: moves in order,
        ValueError and nothing changed on a bad one; K/V copied in ``kv_caches``, or by the
        caller with ``ops.copy_blocks``). No KV event. Returns {old block_id: new block_id}."""
        return apply_moves(self, plan, kv_caches)

    # -- stats and invariants ----------------------------------------------------------------
    def stats(self) -> PoolStats:
        """A snapshot of accounting, utilisation and fragmentation (O(requests + free runs))."""
        return pool_stats(self)

    def num_runs(self, request_id: str) -> int:
        """Number of maximal contiguous id runs in a request's block table."""
        return num_runs(self._get(request_id).block_ids)

    def check_integrity(self) -> None:
        """Raise AssertionError if any pool invariant is broken (see module docstring)."""
        from kvmanager.integrity import check_pool

        check_pool(self)

    # -- internals ---------------------------------------------------------------------------
    def _get(self, request_id: str) -> RequestState:
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        return req

    def _tick(self) -> None:
        self._clock += 1
        self._epochs.tick()

    def _validated(
        self, prefix: PrefixHit | None, token_ids: Sequence[int], extra_keys: tuple[Any, ...] | None
    ) -> PrefixHit:
        if prefix is None:
            return PrefixHit()
        if len(prefix.block_ids) != len(prefix.block_hashes):
            raise ValueError("prefix.block_ids and prefix.block_hashes differ in length")
        for b, h in zip(prefix.block_ids, prefix.block_hashes, strict=True):
            if not 0 <= b < self.num_blocks or self._block_hash[b] != h:
                # NOTE: a block was evicted (or moved) between lookup and allocate: look again.
                return self.lookup_prefix(token_ids, extra_keys)
        return prefix

    def _evict(self, n: int) -> None:
        removed: list[int] = []
        for _ in range(n):
            b = self._evictable.pop(self._is_leaf)
            removed.append(self._drop_hash(b))
            self._num_evicted += 1
        self._events.append(BlockRemoved(removed))

    def _drop_hash(self, block_id: int) -> int:
        h = self._block_hash[block_id]
        assert h is not None and self._ref_cnt[block_id] == 0
        del self._hash_to_block[h]
        parent = self._parent_hash[block_id]
        if parent is not None:
            self._num_children[parent] -= 1
            if self._num_children[parent] == 0:
                del self._num_children[parent]
                parent_block = self._hash_to_block.get(parent)
                if parent_block is not None:
                    self._evictable.leaf_ready(parent_block)
        self._block_hash[block_id] = None
        self._parent_hash[block_id] = None
        self._evictable.forget(block_id)
        self._free.put(block_id)
        return h

    def _is_leaf(self, block_id: int) -> bool:
        h = self._block_hash[block_id]
        return h is None or self._num_children.get(h, 0) == 0
