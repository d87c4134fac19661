"""A_frequency support: how hot a prefix is on a replica (decayed access counts).

NOTE: counting every matched block of every routed request would cost O(prompt blocks) dict
updates per Select. Instead a routed request bumps only its *checkpoint* blocks, the ones at
positions 2^k − 1 (blocks 1, 2, 4, 8, ... of the chain), O(log n). A later request whose prefix
matches m blocks reads the deepest checkpoint below m: every earlier request that went through
that prefix bumped exactly that block, so the count means "requests routed here through (at
least) the first 2^k matched blocks".

Counts decay exponentially with ``half_life_s``; values are computed lazily at read time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence


def checkpoint_below(num_matched: int) -> int:
    """Index of the deepest checkpoint inside a prefix of ``num_matched`` (>= 1) blocks."""
    return (1 << (num_matched.bit_length() - 1)) - 1


class AccessTracker:
    """Per slot: checkpoint block_hash -> (decayed count, last update time)."""

    def __init__(
        self, clock: Callable[[], float], half_life_s: float = 60.0, max_entries: int = 200_000
    ) -> None:
        self._clock = clock
        self._rate = math.log(2.0) / half_life_s
        self._max_entries = max_entries
        self._counts: dict[int, dict[int, tuple[float, float]]] = {}

    def bump(self, slot: int, block_hashes: Sequence[int]) -> None:
        """A request routed to ``slot`` accessed every block of ``block_hashes``."""
        now = self._clock()
        counts = self._counts.setdefault(slot, {})
        i, n = 0, len(block_hashes)
        while i < n:
            h = block_hashes[i]
            old = counts.get(h)
            value = 1.0 if old is None else 1.0 + old[0] * math.exp(-self._rate * (now - old[1]))
            counts[h] = (value, now)
            i = 2 * i + 1
        if len(counts) > self._max_entries:
            self._prune(counts, now)

    def hotness(self, slot: int, block_hashes: Sequence[int], num_matched: int) -> float:
        """Decayed count at the deepest checkpoint of the matched prefix (0 without a match)."""
        if num_matched <= 0:
            return 0.0
        counts = self._counts.get(slot)
        if not counts:
            return 0.0
        entry = counts.get(block_hashes[checkpoint_below(num_matched)])
        if entry is None:
            return 0.0
        return entry[0] * math.exp(-self._rate * (self._clock() - entry[1]))

    def forget(self, slot: int, block_hashes: Iterable[int] | None = None) -> None:
        """Drop counts of evicted blocks (all of the slot's when ``block_hashes`` is None)."""
        counts = self._counts.get(slot)
        if counts is None:
            return
        if block_hashes is None:
            del self._counts[slot]
            return
        for h in block_hashes:
            counts.pop(h, None)

    def _prune(self, counts: dict[int, tuple[float, float]], now: float) -> None:
        keep = sorted(
            counts.items(), key=lambda kv: kv[1][0] * math.exp(-self._rate * (now - kv[1][1]))
        )
        for h, _ in keep[: len(keep) // 2]:
            del counts[h]
