"""MaskTable: block_hash -> bitmask of replica slots, an open-addressing table in numpy arrays.

Layout (cap = 2^bits entries, W = 64-bit words per mask, bit s of row i = slot s holds key i):

    keys  : int64[cap]      block_hash of each entry
    state : uint8[cap]      EMPTY / FULL / TOMB (deleted; probing walks past it)
    masks : uint64[cap, W]  slot bitmask of each FULL entry (never all-zero: such an entry is
                            deleted)

NOTE: why not a dict of Python ints: at 256 replicas x 100k blocks the dict index held 12.8M
int keys, 12.8M 256-bit int masks and 256 per-slot sets (3.4 GB RSS), and a Select spent
~1 us per dict lookup on cache misses. Here an entry costs 9 + 8·W bytes, lookups run in the
compiled walk (``index_kernels``), and a slot's blocks are found by scanning its bit (clear,
resync, leave: rare, ~tens of ms at 16M entries).

Linear probing, Fibonacci hashing of the key, load (FULL + TOMB) kept <= 3/4 by rehashing.
Contract: not thread-safe (the core serialises calls). Arrays are replaced on growth, so never
keep a reference to them across calls.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cluster import index_kernels as k

I64 = npt.NDArray[np.int64]
MAX_LOAD = 0.75


class MaskTable:
    """Slot bitmasks by 64-bit block hash; see the module docstring."""

    def __init__(self, num_words: int = 1, bits: int = 10) -> None:
        self.bits = bits
        self.keys = np.zeros(1 << bits, np.int64)
        self.state = np.zeros(1 << bits, np.uint8)
        self.masks = np.zeros((1 << bits, num_words), np.uint64)
        self.count = 0  # FULL entries
        self.tombs = 0

    @property
    def num_words(self) -> int:
        return int(self.masks.shape[1])

    def __len__(self) -> int:
        return self.count

    def widen(self, num_words: int) -> None:
        """Make room for slots < 64·num_words (masks grow; existing bits kept)."""
        if num_words <= self.num_words:
            return
        masks = np.zeros((len(self.keys), num_words), np.uint64)
        masks[:, : self.num_words] = self.masks
        self.masks = masks

    def _reserve(self, num_new: int) -> None:
        cap = len(self.keys)
        if self.count + self.tombs + num_new <= MAX_LOAD * cap:
            return
        bits = self.bits
        # NOTE: grow only for live entries; a table full of tombstones is rebuilt in place size.
        while self.count + num_new > MAX_LOAD * (1 << bits) / 1.5:
            bits += 1
        keys = np.zeros(1 << bits, np.int64)
        state = np.zeros(1 << bits, np.uint8)
        masks = np.zeros((1 << bits, self.num_words), np.uint64)
        k.rehash(self.keys, self.state, self.masks, keys, state, masks, bits)
        self.keys, self.state, self.masks, self.bits, self.tombs = keys, state, masks, bits, 0

    def set_bits(self, hashes: I64, slot: int) -> int:
        """Set ``slot``'s bit on every hash (inserting new keys); returns how many were newly
        set (duplicates and already-set bits count 0)."""
        self._reserve(len(hashes))
        added, created, reused = k.set_bits(
            self.keys, self.state, self.masks, self.bits, hashes, slot
        )
        self.count += int(created)
        self.tombs -= int(reused)  # NOTE: a new key may take a tombstone's place
        return int(added)

    def clear_bits(self, hashes: I64, slot: int) -> int:
        """Clear ``slot``'s bit on every hash (deleting keys whose mask empties); returns how
        many bits were cleared (unknown hashes and clear bits count 0)."""
        cleared, deleted = k.clear_bits(self.keys, self.state, self.masks, self.bits, hashes, slot)
        self.count -= deleted
        self.tombs += deleted
        return int(cleared)

    def clear_slot(self, slot: int) -> I64:
        """Clear ``slot``'s bit everywhere; returns the hashes it held (a full scan)."""
        held, deleted = k.clear_slot(self.keys, self.state, self.masks, slot)
        self.count -= deleted
        self.tombs += deleted
        out: I64 = held
        return out

    def has(self, block_hash: int, slot: int) -> bool:
        return bool(k.has_bit(self.keys, self.state, self.masks, self.bits, block_hash, slot))

    def count_slot(self, slot: int) -> int:
        return int(k.count_slot(self.state, self.masks, slot))

    def keys_missing_from(self, other: MaskTable) -> int:
        """How many of this table's keys ``other`` does not hold (for the union size)."""
        return int(k.count_missing(self.keys, self.state, other.keys, other.state, other.bits))

    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.state.nbytes + self.masks.nbytes)
