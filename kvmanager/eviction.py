"""Eviction policies for cached, unreferenced blocks (the evictable set).

A block enters the evictable set when its ``ref_cnt`` drops to 0 while it holds a cached
``block_hash``; it leaves when a prefix hit references it again (``remove``) or when it is
chosen as a victim (``pop``). ``now`` is the pool's logical clock (one tick per operation), so
runs are deterministic.

- ``lru``: least recently released/touched first. Blocks of one request are released leaf
  first, so for equal recency the chain's tail goes before its head (as in vLLM).
- ``adaptive`` (TinyServe): score = log Σ_i exp(λ·t_i) over the block's access times t_i, the
  LRFU combined recency-frequency value (Lee et al., 2001) kept in the log domain so it never
  needs re-decaying: at any common "now" it orders blocks exactly as Σ exp(−λ(now − t_i)).
  λ = ln 2 / half_life. Only chain LEAVES are victims (no cached child), and among equal
  scores deeper blocks go first, so a shared system prompt outlives its branches.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable


class EvictionPolicy(ABC):
    """Orders the evictable set. The pool owns the set's membership rules."""

    name: str

    @abstractmethod
    def add(self, block_id: int, now: int) -> None:
        """``block_id`` became evictable at ``now``."""

    @abstractmethod
    def remove(self, block_id: int) -> None:
        """``block_id`` is no longer evictable (referenced again)."""

    @abstractmethod
    def touch(self, block_id: int, now: int, depth: int) -> None:
        """Record an access (store or prefix hit) of ``block_id`` at ``now``."""

    @abstractmethod
    def pop(self, is_leaf: Callable[[int], bool]) -> int:
        """Choose and remove a victim. Raises IndexError when the set is empty."""

    @abstractmethod
    def eviction_order(self) -> list[int]:
        """Every evictable block, the next victim first (leaf rules aside): a snapshot."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, block_id: object) -> bool: ...

    def forget(self, block_id: int) -> None:  # noqa: B027 - optional hook, default no-op
        """Drop all history of ``block_id`` (its hash was removed)."""

    def leaf_ready(self, block_id: int) -> None:  # noqa: B027 - optional hook, default no-op
        """``block_id`` lost its last cached child: it may now be a victim."""

    def rename(self, old: int, new: int) -> None:
        """Compaction moved an evictable block: keep its place and history under ``new``."""
        self.rename_many({old: new})

    @abstractmethod
    def rename_many(self, remap: dict[int, int]) -> None:
        """Compaction moved evictable blocks (old -> new, all at once: a new id may be another
        entry's old id): keep their order and history under the new ids."""


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def add(self, block_id: int, now: int) -> None:
        self._order[block_id] = None

    def remove(self, block_id: int) -> None:
        del self._order[block_id]

    def touch(self, block_id: int, now: int, depth: int) -> None:
        if block_id in self._order:
            self._order.move_to_end(block_id)

    def pop(self, is_leaf: Callable[[int], bool]) -> int:
        return self._order.popitem(last=False)[0]

    def eviction_order(self) -> list[int]:
        return list(self._order)

    def rename_many(self, remap: dict[int, int]) -> None:
        # NOTE: one rebuild keeps the order; O(evictable) per compaction, not per move.
        if remap:
            self._order = OrderedDict((remap.get(b, b), None) for b in self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._order


class AdaptivePolicy(EvictionPolicy):
    name = "adaptive"

    def __init__(self, half_life: float) -> None:
        self._lam = math.log(2.0) / half_life
        self._score: dict[int, float] = {}  # log-domain LRFU value per block
        self._depth: dict[int, int] = {}
        self._version: dict[int, int] = {}  # bumps invalidate stale heap entries
        self._heap: list[tuple[float, int, int, int]] = []  # (score, -depth, version, block_id)
        self._members: set[int] = set()

    def _push(self, block_id: int) -> None:
        v = self._version.get(block_id, 0) + 1
        self._version[block_id] = v
        entry = (self._score.get(block_id, -math.inf), -self._depth.get(block_id, 0), v, block_id)
        heapq.heappush(self._heap, entry)

    def add(self, block_id: int, now: int) -> None:
        self._members.add(block_id)
        self._push(block_id)

    def remove(self, block_id: int) -> None:
        self._members.discard(block_id)
        self._version[block_id] = self._version.get(block_id, 0) + 1

    def touch(self, block_id: int, now: int, depth: int) -> None:
        x = self._lam * now
        old = self._score.get(block_id)
        self._score[block_id] = x if old is None else max(old, x) + math.log1p(
            math.exp(-abs(old - x))
        )
        self._depth[block_id] = depth
        if block_id in self._members:
            self._push(block_id)

    def pop(self, is_leaf: Callable[[int], bool]) -> int:
        while self._heap:
            _, _, v, block_id = heapq.heappop(self._heap)
            if block_id not in self._members or self._version[block_id] != v:
                continue
            if is_leaf(block_id):
                self._members.discard(block_id)
                return block_id
            # NOTE: a parent whose child is still cached drops out of the heap; the pool calls
            # ``leaf_ready`` when its last cached child goes, which pushes it back.
        if not self._members:
            raise IndexError("no evictable block")
        # only parents of referenced children are left: evict the coldest of them
        victim = min(self._members, key=lambda b: self._score.get(b, -math.inf))
        self._members.discard(victim)
        return victim

    def eviction_order(self) -> list[int]:
        # NOTE: the heap's key (score, -depth): coldest first, deeper first among equals.
        return sorted(
            self._members, key=lambda b: (self._score.get(b, -math.inf), -self._depth.get(b, 0))
        )

    def leaf_ready(self, block_id: int) -> None:
        if block_id in self._members:
            self._push(block_id)

    def rename_many(self, remap: dict[int, int]) -> None:
        if not remap:
            return
        # NOTE: histories move with their blocks; a stale heap entry (old id, old version) is
        # skipped by pop, and every moved member gets a fresh entry under its new id.
        score = {b: self._score.pop(b) for b in remap if b in self._score}
        depth = {b: self._depth.pop(b) for b in remap if b in self._depth}
        moved = [b for b in remap if b in self._members]
        for b in moved:
            self.remove(b)
        for b, s in score.items():
            self._score[remap[b]] = s
        for b, d in depth.items():
            self._depth[remap[b]] = d
        for b in moved:
            self.add(remap[b], 0)

    def forget(self, block_id: int) -> None:
        self._score.pop(block_id, None)
        self._depth.pop(block_id, None)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._members


def make_eviction_policy(name: str, half_life: float) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "adaptive":
        return AdaptivePolicy(half_life)
    raise ValueError(f"unknown eviction policy {name!r}; expected 'lru' or 'adaptive'")
