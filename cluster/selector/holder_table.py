"""HolderTable: block_hash -> the replica slots holding it (the resident tiers of the index) or
with a pending mark on it (the speculative inserts, ``pending_rows``).

Layout (``holder_kernels`` draws the row): ``tab`` uint64[2^bits, 2], 16 B a row (key, up to
three slot ids inline), and ``over`` uint64[ocap, W], one holder bitmask per block held by four
or more slots (W = 64-bit words for the slots tracked). Linear probing (Fibonacci hashing of
the key) with backward-shift deletes, no tombstones; live rows kept <= ``max_load`` of the
table by doubling (4/5; the pending rows 1/2, ``KVIndex``; ``reserve`` sizes a table ahead,
so a hot path never pays for a doubling), and ``over`` doubles when its free rows run out
(``reserve_overflow`` ahead of compiled callers that cannot grow it).

NOTE: why not a mask row (a key plus W mask words, 8·(1 + W) B, the index's first layout): at
256 slots (W = 4) the device tier of 12.8M blocks took 16.8M rows x 40 B = 640 MiB, nearly all
zero words: a block is held by one or two replicas in a fleet with prefix-aware routing. Here
the same rows cost 16 B (256 MiB), and only blocks held by 4+ slots pay a mask (8·W B more).
The pending marks moved to these rows too (a mark is nearly always one slot): 2.5x fewer
cache lines for a mark's insert and backward-shift delete (benchmarks/README.md, "Fourteenth
pass").
NOTE: why not a dict of Python ints: at 256 replicas x 100k blocks the dict index held 12.8M
int keys, 12.8M 256-bit int masks and 256 per-slot sets (3.4 GB RSS), and a Select spent
~1 us per dict lookup on cache misses; here lookups run in the compiled walk (``walk_kernel``).

Contract: not thread-safe (the core serialises calls). ``tab`` and ``over`` are replaced on
growth, so never keep a reference to them across calls. Slots must be < 64·num_words (see
``widen``) and <= ``holder_kernels.MAX_SLOT``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cluster.selector import holder_kernels as hk
from cluster.selector import index_kernels as k
from cluster.selector.generation import bump

U64 = npt.NDArray[np.uint64]
MAX_LOAD = 0.8


def grown_bits(num_keys: int, bits: int, max_load: float = MAX_LOAD) -> int:
    """The table size (log2 rows) for ``num_keys`` keys: ``bits`` while they fit under
    ``max_load``, else the first size that holds them at no more than ``max_load / 1.5`` (room
    to grow before the next doubling)."""
    if num_keys <= max_load * (1 << bits):
        return bits
    while num_keys > max_load * (1 << bits) / 1.5:
        bits += 1
    return bits


class HolderTable:
    """Holder slots by 64-bit block hash; see the module docstring."""

    def __init__(
        self, num_words: int = 1, bits: int = 10, overflow_rows: int = 64,
        max_load: float = MAX_LOAD,
    ) -> None:  # fmt: skip
        self.bits, self.max_load = bits, max_load
        self.tab = k.zeros((1 << bits, 2), np.uint64)
        self.over = k.zeros((0, num_words), np.uint64)
        bump()
        self.ostate = np.asarray([-1, 0], np.int64)  # [first free overflow row, rows in use]
        self.count = 0  # live rows
        self._grow_overflow(overflow_rows)

    @property
    def num_words(self) -> int:
        return int(self.over.shape[1])

    @property
    def num_overflow(self) -> int:
        """Blocks held by more slots than fit inline (rows of ``over`` in use)."""
        return int(self.ostate[1])

    def __len__(self) -> int:
        return self.count

    def widen(self, num_words: int) -> None:
        """Make room for slots < 64·num_words (overflow masks grow; existing bits kept)."""
        if num_words <= self.num_words:
            return
        if 64 * num_words - 1 > hk.MAX_SLOT:
            raise ValueError(f"at most {hk.MAX_SLOT + 1} slots fit an inline slot field")
        over = k.zeros((len(self.over), num_words), np.uint64)
        over[:, : self.over.shape[1]] = self.over
        self.over = over
        bump()

    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more keys without another doubling."""
        bits = grown_bits(self.count + num_new, self.bits, self.max_load)
        if bits == self.bits:
            return
        new = k.zeros((1 << bits, 2), np.uint64)
        hk.rehash(self.tab, new, bits)
        self.tab, self.bits = new, bits
        bump()

    def reserve_overflow(self, num_rows: int) -> None:
        """Make room for ``num_rows`` more blocks in the overflow pool (what a compiled caller
        that cannot grow the pool needs: ``pending_rows.mark`` of ``num_rows`` hashes)."""
        free = len(self.over) - self.ostate.item(1)
        if free < num_rows:
            self._grow_overflow(num_rows - free)

    def _grow_overflow(self, num_rows: int) -> None:
        """Add ``num_rows`` free overflow rows (the pool at least doubles)."""
        old = len(self.over)
        num_rows = max(num_rows, old)
        over = k.zeros((old + num_rows, self.over.shape[1]), np.uint64)
        over[:old] = self.over
        # NOTE: free list links are next + 1; the new rows go in front of the (empty) list
        new = np.arange(old, old + num_rows, dtype=np.int64)
        over[new, 0] = (new + 2).astype(np.uint64)
        over[old + num_rows - 1, 0] = np.uint64(self.ostate[0] + 1)
        self.over, self.ostate[0] = over, old
        bump()

    def set_slot(self, hashes: U64, slot: int) -> int:
        """Add ``slot`` as a holder of every hash (inserting new keys); returns how many were
        newly added (duplicates and existing holders count 0)."""
        self.reserve(len(hashes))
        added = start = 0
        while True:
            a, created, start = hk.set_slot(
                self.tab, self.bits, self.over, self.ostate, hashes, slot, start, k.SINK
            )
            added += int(a)
            self.count += int(created)
            if start >= len(hashes):
                return added
            self._grow_overflow(len(self.over))

    def clear_slot_of(self, hashes: U64, slot: int) -> int:
        """Remove ``slot`` from every hash (deleting keys left with no holder); returns how many
        were removed (unknown hashes and non-holders count 0)."""
        removed, deleted = hk.clear_slot_of(
            self.tab, self.bits, self.over, self.ostate, hashes, slot, k.SINK
        )
        self.count -= int(deleted)
        return int(removed)

    def clear_slot(self, slot: int) -> None:
        """Remove ``slot`` everywhere (a full scan)."""
        self.count -= int(hk.clear_slot(self.tab, self.bits, self.over, self.ostate, slot))

    def has(self, block_hash: np.uint64, slot: int) -> bool:
        return bool(hk.has_slot(self.tab, self.bits, self.over, block_hash, slot))

    def holders(self, block_hash: np.uint64) -> U64:
        """The holder mask words of ``block_hash`` (all zero when unknown)."""
        out = np.zeros(self.num_words, np.uint64)
        hk.holder_words(self.tab, self.over, hk.find(self.tab, self.bits, block_hash), out)
        return out

    def keys_missing_from(self, other: HolderTable) -> int:
        """How many of this table's keys ``other`` does not hold (for the union size)."""
        return int(hk.count_missing(self.tab, other.tab, other.bits))

    def nbytes(self) -> int:
        return int(self.tab.nbytes + self.over.nbytes)


_warm = False


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every holder kernel once per process. Idempotent."""
    global _warm
    if _warm:
        return
    t, other = HolderTable(bits=4, overflow_rows=1), HolderTable(bits=4)
    h = np.arange(1, 20, dtype=np.uint64)  # NOTE: 19 keys into 16 rows: forces a rehash
    for s in range(5):  # NOTE: a 4th and 5th holder: overflow rows, then a pool growth
        t.set_slot(h[:3], s)
    t.set_slot(h, 1)
    other.set_slot(h[:3], 0)
    t.clear_slot_of(h[:2], 1)
    t.has(h[3], 1)
    t.holders(h[0])
    t.keys_missing_from(other)
    t.clear_slot(1)
    _warm = True
