"""MaskTable: block_hash -> bitmask of replica slots, an open-addressing table in one array.

Layout (cap = 2^bits rows, W = 64-bit words per mask, bit s of a mask = slot s holds the key):

    tab : uint64[cap, 1 + W]   row = [block_hash (as uint64), mask word 0, ..., mask word W-1]

A row is live while its mask is non-zero and empty otherwise; a row whose mask empties is
deleted by shifting its probe run back (``index_kernels.delete_row``: no tombstones). NOTE: key
and mask share a row, so a probe
touches one cache line, not three (keys, states and masks in separate arrays cost ~2x in the
Select walk at 16M rows).

NOTE: why not a dict of Python ints: at 256 replicas x 100k blocks the dict index held 12.8M
int keys, 12.8M 256-bit int masks and 256 per-slot sets (3.4 GB RSS), and a Select spent
~1 us per dict lookup on cache misses. Here a row costs 8·(1 + W) bytes, lookups run in the
compiled walk (``walk_kernel``), and a slot's blocks are found by scanning its bit.
It holds the pending marks (a few hundred thousand, short-lived); the resident tiers moved to
``HolderTable``'s 16-byte rows (at 256 slots this row is 40 B, mostly zero words).

Linear probing, Fibonacci hashing of the key, live rows kept <= 4/5 of the table by doubling
(``reserve`` sizes a table ahead, so a hot path never pays for a doubling). Contract: not
thread-safe (the core serialises calls). The array is replaced on growth, so never keep a
reference to it across calls.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cluster.selector import index_kernels as k
from cluster.selector.generation import bump

U64 = npt.NDArray[np.uint64]
MAX_LOAD = 0.8


def grown_bits(num_keys: int, bits: int) -> int:
    """The table size (log2 rows) for ``num_keys`` keys: ``bits`` while they fit under
    ``MAX_LOAD``, else the first size that holds them at no more than ``MAX_LOAD / 1.5`` (room
    to grow before the next doubling)."""
    if num_keys <= MAX_LOAD * (1 << bits):
        return bits
    while num_keys > MAX_LOAD * (1 << bits) / 1.5:
        bits += 1
    return bits


class MaskTable:
    """Slot bitmasks by 64-bit block hash; see the module docstring."""

    def __init__(self, num_words: int = 1, bits: int = 10) -> None:
        self.bits = bits
        self.tab = k.zeros((1 << bits, 1 + num_words), np.uint64)
        bump()
        self.count = 0  # live rows

    @property
    def num_words(self) -> int:
        return int(self.tab.shape[1]) - 1

    def __len__(self) -> int:
        return self.count

    def widen(self, num_words: int) -> None:
        """Make room for slots < 64·num_words (masks grow; existing bits kept)."""
        if num_words <= self.num_words:
            return
        tab = k.zeros((len(self.tab), 1 + num_words), np.uint64)
        tab[:, : self.tab.shape[1]] = self.tab
        self.tab = tab
        bump()

    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more keys without another doubling."""
        bits = grown_bits(self.count + num_new, self.bits)
        if bits == self.bits:
            return
        new = k.zeros((1 << bits, self.tab.shape[1]), np.uint64)
        k.rehash(self.tab, new, bits)
        self.tab, self.bits = new, bits
        bump()

    def set_bits(self, hashes: U64, slot: int) -> int:
        """Set ``slot``'s bit on every hash (inserting new keys); returns how many were newly
        set (duplicates and already-set bits count 0)."""
        self.reserve(len(hashes))
        added, created = k.set_bits(self.tab, self.bits, hashes, slot, k.SINK)
        self.count += int(created)
        return int(added)

    def clear_bits(self, hashes: U64, slot: int) -> int:
        """Clear ``slot``'s bit on every hash (deleting keys whose mask empties); returns how
        many bits were cleared (unknown hashes and clear bits count 0)."""
        cleared, deleted = k.clear_bits(self.tab, self.bits, hashes, slot, k.SINK)
        self.count -= int(deleted)
        return int(cleared)

    def clear_slot(self, slot: int) -> None:
        """Clear ``slot``'s bit everywhere (a full scan)."""
        self.count -= int(k.clear_slot(self.tab, self.bits, slot))

    def has(self, block_hash: np.uint64, slot: int) -> bool:
        return bool(k.has_bit(self.tab, self.bits, block_hash, slot))

    def keys_missing_from(self, other: MaskTable) -> int:
        """How many of this table's keys ``other`` does not hold (for the union size)."""
        return int(k.count_missing(self.tab, other.tab, other.bits))

    def nbytes(self) -> int:
        return int(self.tab.nbytes)


_warm = False


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel once per process, so the first
    Select never pays for it (a service starts serving only after this). Idempotent."""
    global _warm
    if _warm:
        return
    t, other = MaskTable(bits=4), MaskTable(bits=4)
    h = np.arange(1, 20, dtype=np.uint64)  # NOTE: 19 keys into 16 rows: forces a rehash
    t.set_bits(h, 1)
    other.set_bits(h[:3], 0)
    t.clear_bits(h[:2], 1)
    t.has(h[3], 1)
    t.keys_missing_from(other)
    t.clear_slot(1)
    _warm = True
