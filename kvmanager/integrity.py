"""Pool invariant checks (``KVCacheManager.check_integrity``); O(num_blocks), for tests and
the engine's idle loop. Raises AssertionError explicitly so ``python -O`` keeps the checks."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmanager.manager import KVCacheManager


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(f"pool integrity: {msg}")


def check_pool(mgr: KVCacheManager) -> None:
    n = mgr.num_blocks
    free = mgr._free
    evictable = mgr._evictable
    # free runs: disjoint, maximal, in range, and their count matches
    runs = list(free.runs())
    prev_end = -1
    for start, length in runs:
        _require(length > 0 and start >= 0 and start + length <= n, f"bad run ({start}, {length})")
        _require(start > prev_end, f"runs overlap or touch at {start} (not maximal)")
        prev_end = start + length
    empty = {b for start, length in runs for b in range(start, start + length)}
    _require(len(empty) == free.num_free, "free count differs from run contents")
    for rid, (start, length) in mgr._alloc.reserved.items():
        _require(rid in mgr._requests, f"reservation of unknown request {rid!r}")
        span = set(range(start, start + length))
        _require(length > 0 and not span & empty, f"reservation of {rid!r} overlaps free runs")
        empty |= span
    _require(
        len(empty) == free.num_free + mgr._alloc.num_reserved, "reservations overlap or miscount"
    )
    # ref counts equal the number of block tables holding each block
    held: Counter[int] = Counter()
    for req in mgr._requests.values():
        _require(len(set(req.block_ids)) == len(req.block_ids), "block repeated in one table")
        held.update(req.block_ids)
        _require(
            req.num_computed_tokens <= len(req.block_ids) * mgr.block_size,
            "num_computed_tokens beyond the block table",
        )
    num_used = 0
    for b in range(n):
        ref, h = mgr._ref_cnt[b], mgr._block_hash[b]
        _require(ref == held.get(b, 0), f"block {b}: ref_cnt {ref} != {held.get(b, 0)} tables")
        if b in empty:
            _require(ref == 0 and h is None, f"empty block {b} has ref_cnt or hash")
            _require(b not in evictable, f"empty block {b} is evictable")
        elif ref == 0:
            _require(h is not None and b in evictable, f"block {b}: unreferenced, not cached")
        else:
            num_used += 1
            _require(b not in evictable, f"used block {b} is evictable")
        if h is not None:
            _require(mgr._hash_to_block.get(h) == b, f"block {b}: hash map disagrees")
    _require(
        len(empty) + len(evictable) + num_used == n,
        f"empty {len(empty)} + evictable {len(evictable)} + used {num_used} != {n}",
    )
    for h, b in mgr._hash_to_block.items():
        _require(mgr._block_hash[b] == h, f"hash map entry {h:#x} -> {b} is stale")
    children: Counter[int] = Counter(
        p for b, p in enumerate(mgr._parent_hash) if p is not None and mgr._block_hash[b] is not None
    )
    _require(children == +mgr._num_children, "cached-children counts disagree")
