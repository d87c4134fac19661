"""Compaction: pack every block that holds K/V into the low block ids.

    before:  U . U U . . U . U .      U = holds K/V (used or evictable), . = empty
    frontier = #U = 5
    moves:   8 -> 1, 6 -> 4           sources: U at ids >= frontier, highest first
                                      destinations: empty ids < frontier, lowest first
    after:   U U U U U . . . . .

The plan is minimal: a block already below the frontier never moves, and every U above it
must move (the holes below the frontier are exactly as many as they are). Sources and
destinations are disjoint, so the copy is order-independent; the batched block-copy kernel
(cuda_kernels) executes the same list on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvmanager.free_runs import FreeRuns

if TYPE_CHECKING:
    from kvmanager.manager import KVCacheManager


def plan_moves(free: FreeRuns, num_blocks: int) -> list[tuple[int, int]]:
    """(src, dst) moves that leave free space as the single run [frontier, num_blocks)."""
    frontier = num_blocks - free.num_free
    holes: list[int] = []  # empty ids below the frontier, ascending
    occupied_above: list[int] = []  # non-empty ids at/above the frontier, ascending
    prev_end = 0
    for start, length in free.runs():
        occupied_above.extend(range(max(prev_end, frontier), start))  # the gap before this run
        holes.extend(range(start, min(start + length, frontier)))
        prev_end = start + length
    occupied_above.extend(range(max(prev_end, frontier), num_blocks))
    assert len(holes) == len(occupied_above), "compaction plan out of balance"
    return list(zip(reversed(occupied_above), holes, strict=True))


def copy_blocks_reference(
    kv_caches: Sequence[torch.Tensor], srcs: Sequence[int], dsts: Sequence[int]
) -> None:
    """cache[dst] = cache[src] for every tensor (block dimension first). Gather-then-scatter:
    correct for disjoint source/destination sets."""
    if not srcs:
        return
    for cache in kv_caches:
        src = torch.tensor(srcs, dtype=torch.long, device=cache.device)
        dst = torch.tensor(dsts, dtype=torch.long, device=cache.device)
        cache.index_copy_(0, dst, cache.index_select(0, src))


def apply_moves(
    mgr: KVCacheManager, moves: Sequence[tuple[int, int]], kv_caches: Sequence[torch.Tensor]
) -> None:
    """Execute a plan on ``mgr`` (see ``KVCacheManager.apply_compaction``): validate, copy the
    data, then rewrite ref counts, hashes, the hash map, free space and every block table."""
    mgr._alloc.release_all()
    srcs, dsts = [s for s, _ in moves], [d for _, d in moves]
    if len(set(srcs)) != len(srcs) or len(set(dsts)) != len(dsts) or set(srcs) & set(dsts):
        raise ValueError("compaction moves need distinct sources, distinct destinations, disjoint sets")
    for s, d in moves:
        if not (0 <= s < mgr.num_blocks and 0 <= d < mgr.num_blocks):
            raise ValueError(f"move ({s}, {d}) outside the pool of {mgr.num_blocks} blocks")
        if mgr._free.is_free(s) or not mgr._free.is_free(d):
            raise ValueError(f"move ({s}, {d}): source must hold data, destination be empty")
    copy_blocks_reference(kv_caches, srcs, dsts)
    remap = dict(moves)
    for s, d in moves:
        mgr._free.take_block(d)
        mgr._ref_cnt[d], mgr._ref_cnt[s] = mgr._ref_cnt[s], 0
        h = mgr._block_hash[s]
        mgr._block_hash[d], mgr._block_hash[s] = h, None
        mgr._parent_hash[d], mgr._parent_hash[s] = mgr._parent_hash[s], None
        if h is not None:
            mgr._hash_to_block[h] = d
        if s in mgr._evictable:
            mgr._evictable.rename(s, d)
    for s, _ in moves:
        mgr._free.put(s)
    for req in mgr._requests.values():
        req.block_ids = [remap.get(b, b) for b in req.block_ids]
