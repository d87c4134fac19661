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

import torch

from kvmanager.free_runs import FreeRuns


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
