"""The dict-of-dicts AccessTracker that ``cluster.selector.access`` replaced: the test reference.

A_frequency support: how hot a prefix is on a replica (decayed access counts).

NOTE: counting every matched block of every routed request would cost O(prompt blocks) dict
updates per Select. Instead a routed request bumps only its *checkpoint* blocks, the ones at
positions 2^k − 1 (blocks 1, 2, 4, 8, ... of the chain), O(log n). A later request whose prefix
matches m blocks on a replica reads the deepest checkpoint below m: every earlier request that
went through that prefix bumped exactly that block, so the count means "requests routed here
through (at least) the first 2^k matched blocks".

Layout: checkpoint block_hash -> {slot: (decayed count, last update time)}. Reading is one dict
lookup per distinct matched length, then only the slots that ever served that prefix. Counts
decay exponentially with ``half_life_s``, lazily at read time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt


def checkpoint_below(num_matched: int) -> int:
    """Index of the deepest checkpoint inside a prefix of ``num_matched`` (>= 1) blocks."""
    return (1 << (num_matched.bit_length() - 1)) - 1


class AccessTracker:
    """Decayed per-(checkpoint hash, slot) access counts."""

    def __init__(
        self, clock: Callable[[], float], half_life_s: float = 60.0, max_entries: int = 200_000
    ) -> None:
        self._clock = clock
        self._rate = math.log(2.0) / half_life_s
        self._max_entries = max_entries
        self._counts: dict[int, dict[int, tuple[float, float]]] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def bump(self, slot: int, block_hashes: Sequence[int]) -> None:
        """A request routed to ``slot`` accessed every block of ``block_hashes``."""
        now = self._clock()
        i, n = 0, len(block_hashes)
        while i < n:
            per_slot = self._counts.setdefault(block_hashes[i], {})
            old = per_slot.get(slot)
            value = 1.0 if old is None else 1.0 + old[0] * math.exp(-self._rate * (now - old[1]))
            per_slot[slot] = (value, now)
            i = 2 * i + 1
        if len(self._counts) > self._max_entries:
            self._prune(now)

    def hotness(
        self, block_hashes: Sequence[int], matched: npt.NDArray[np.int64], lengths: Iterable[int]
    ) -> npt.NDArray[np.float64]:
        """Decayed count at the deepest checkpoint of each slot's matched prefix (``matched``
        indexed by slot; ``lengths`` the distinct non-zero values in it)."""
        hot = np.zeros(len(matched), np.float64)
        if not self._counts:
            return hot
        now = self._clock()
        for cp in {checkpoint_below(n) for n in lengths}:
            per_slot = self._counts.get(block_hashes[cp])
            if not per_slot:
                continue
            for slot, (value, t) in per_slot.items():
                if (
                    slot < len(matched)
                    and matched[slot]
                    and checkpoint_below(int(matched[slot])) == cp
                ):
                    hot[slot] = value * math.exp(-self._rate * (now - t))
        return hot

    def forget(self, slot: int, block_hashes: Iterable[int] | None = None) -> None:
        """Drop the slot's counts for evicted blocks (all of them when ``block_hashes`` is None)."""
        keys = list(self._counts) if block_hashes is None else block_hashes
        for h in keys:
            per_slot = self._counts.get(h)
            if per_slot is not None and per_slot.pop(slot, None) is not None and not per_slot:
                del self._counts[h]

    def _prune(self, now: float) -> None:
        def heat(item: tuple[int, dict[int, tuple[float, float]]]) -> float:
            return max(v * math.exp(-self._rate * (now - t)) for v, t in item[1].values())

        coldest = sorted(self._counts.items(), key=heat)[: len(self._counts) // 2]
        for h, _ in coldest:
            del self._counts[h]
