"""A_frequency support: how hot a prefix is on a replica (decayed access counts).

NOTE: counting every matched block of every routed request would cost O(prompt blocks)
updates per Select. Instead a routed request bumps only its *checkpoint* blocks, the ones at
positions 2^k − 1 (blocks 1, 2, 4, 8, ... of the chain), O(log n). A later request whose prefix
matches m blocks on a replica reads the deepest checkpoint below m: every earlier request that
went through that prefix bumped exactly that block, so the count means "requests routed here
through (at least) the first 2^k matched blocks".

Layout (cap = 2^bits entries, open addressing on (checkpoint block_hash, slot) as in
``pending_deadlines``, linear probing):

    keys  : uint64[cap]      checkpoint block_hash
    slots : int64[cap]       0 empty, -1 tombstone, else slot + 1
    vt    : float64[2, cap]  decayed count at its last update, time of that update

Counts decay exponentially with ``half_life_s``, lazily at read time. Past ``max_entries``
(hash, slot) pairs the coldest half is dropped.
NOTE: arrays and compiled loops, not a dict of dicts: the Select kernel reads the hotness of
every candidate inside its one compiled pass (``select_kernel``), and a bump is one compiled
call instead of ~8 dict updates that fed the garbage collector.
Contract: not thread-safe (the core serialises calls); arrays are replaced on growth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.selector.generation import bump
from cluster.selector.index import as_hash_array
from cluster.selector.index_kernels import _jit, zeros
from cluster.selector.pending_deadlines import _find, _home

U64 = npt.NDArray[np.uint64]
MAX_LOAD = 0.7


def checkpoint_below(num_matched: int) -> int:
    """Index of the deepest checkpoint inside a prefix of ``num_matched`` (>= 1) blocks."""
    return (1 << (num_matched.bit_length() - 1)) - 1


@_jit
def _checkpoint_below(m: int) -> int:
    cp = 1
    while cp * 2 <= m:
        cp *= 2
    return cp - 1


@_jit
def hot_of(
    keys: Any, slots: Any, vt: Any, bits: int, hashes: Any, m: int, slot: int, now: float,
    rate: float,
) -> float:  # fmt: skip
    """Decayed count of ``slot`` at the deepest checkpoint of its ``m`` matched blocks."""
    if m <= 0:
        return 0.0
    i = _find(keys, slots, bits, hashes[_checkpoint_below(m)], slot)
    if i < 0:
        return 0.0
    return float(vt[0, i] * math.exp(-rate * (now - vt[1, i])))


@_jit
def _upsert(keys: Any, slots: Any, bits: int, key: Any, slot: int) -> tuple[int, int, int]:
    """(row, created, tombstone reused) of (key, slot); a created row must be filled."""
    m = np.int64((1 << bits) - 1)
    i: Any = _home(key, slot, bits)
    tomb = -1
    while True:
        s = slots[i]
        if s == 0:
            if tomb >= 0:
                keys[tomb], slots[tomb] = key, slot + 1
                return tomb, 1, 1
            keys[i], slots[i] = key, slot + 1
            return i, 1, 0
        if s == slot + 1 and keys[i] == key:
            return i, 0, 0
        if s == -1 and tomb < 0:
            tomb = i
        i = (i + 1) & m


@_jit
def bump_kernel(
    keys: Any, slots: Any, vt: Any, bits: int, hashes: Any, slot: int, now: float, rate: float
) -> tuple[int, int]:
    """Count one access of ``slot`` at every checkpoint of ``hashes``. Returns (entries
    created, tombstones reused)."""
    created = reused = 0
    i, n = 0, hashes.shape[0]
    while i < n:
        row, c, r = _upsert(keys, slots, bits, hashes[i], slot)
        created += c
        reused += r
        if c:
            vt[0, row] = 1.0
        else:
            vt[0, row] = 1.0 + vt[0, row] * math.exp(-rate * (now - vt[1, row]))
        vt[1, row] = now
        i = 2 * i + 1
    return created, reused


@_jit
def _hotness(
    keys: Any, slots: Any, vt: Any, bits: int, hashes: Any, matched: Any, now: float,
    rate: float, out: Any,
) -> None:  # fmt: skip
    for s in range(matched.shape[0]):
        out[s] = hot_of(keys, slots, vt, bits, hashes, matched[s], s, now, rate)


@_jit
def _drop_slot(keys: Any, slots: Any, slot: int) -> int:
    """Tombstone every entry of ``slot``; returns how many."""
    n = 0
    for i in range(slots.shape[0]):
        if slots[i] == slot + 1:
            slots[i] = -1
            n += 1
    return n


@_jit
def _forget(keys: Any, slots: Any, bits: int, hashes: Any, slot: int) -> int:
    n = 0
    for j in range(hashes.shape[0]):
        i = _find(keys, slots, bits, hashes[j], slot)
        if i >= 0:
            slots[i] = -1
            n += 1
    return n


@_jit
def _rehash(keys: Any, slots: Any, vt: Any, nkeys: Any, nslots: Any, nvt: Any, nbits: int) -> None:
    for i in range(slots.shape[0]):
        if slots[i] > 0:
            j, _, _ = _upsert(nkeys, nslots, nbits, keys[i], slots[i] - 1)
            nvt[0, j], nvt[1, j] = vt[0, i], vt[1, i]


@_jit
def _prune(slots: Any, vt: Any, now: float, rate: float) -> int:
    """Drop the coldest half of the live entries; returns how many."""
    live = np.flatnonzero(slots > 0)
    heat = np.empty(live.shape[0])
    for j in range(live.shape[0]):
        i = live[j]
        heat[j] = vt[0, i] * math.exp(-rate * (now - vt[1, i]))
    drop = live[np.argsort(heat, kind="mergesort")[: live.shape[0] // 2]]
    for i in drop:
        slots[i] = -1
    return int(drop.shape[0])


class AccessTracker:
    """Decayed per-(checkpoint hash, slot) access counts; see the module docstring."""

    def __init__(
        self,
        clock: Callable[[], float],
        half_life_s: float = 60.0,
        max_entries: int = 200_000,
        bits: int = 10,
    ) -> None:
        self._clock = clock
        self.rate = math.log(2.0) / half_life_s
        self._max_entries = max_entries
        self.count = 0
        self.tombs = 0
        self._alloc(bits)

    def _alloc(self, bits: int) -> None:
        self.bits = bits
        self.keys = zeros(1 << bits, np.uint64)
        self.slots = zeros(1 << bits, np.int64)
        self.vt = zeros((2, 1 << bits), np.float64)
        bump()

    def __len__(self) -> int:
        """Live (checkpoint hash, slot) entries."""
        return self.count

    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more entries without another doubling."""
        if self.count + self.tombs + num_new <= MAX_LOAD * len(self.keys):
            return
        bits = self.bits
        while self.count + num_new > MAX_LOAD * (1 << bits) / 1.5:
            bits += 1
        old = (self.keys, self.slots, self.vt)
        self._alloc(bits)
        _rehash(*old, self.keys, self.slots, self.vt, bits)
        self.tombs = 0

    def bump(self, slot: int, block_hashes: Sequence[int] | U64) -> None:
        """A request routed to ``slot`` accessed every block of ``block_hashes``."""
        hashes = as_hash_array(block_hashes)
        self.reserve(max(len(hashes), 1).bit_length())
        now = self._clock()
        created, reused = bump_kernel(
            self.keys, self.slots, self.vt, self.bits, hashes, slot, now, self.rate
        )
        self.bumped(int(created), int(reused), now)

    def bumped(self, created: int, reused: int, now: float) -> None:
        """Book-keeping after ``bump_kernel`` ran elsewhere (``select_kernel.rank_and_route``,
        after ``reserve``): its (created, reused) counts; prunes past ``max_entries``."""
        self.count += created
        self.tombs -= reused
        if self.count > self._max_entries:
            dropped = int(_prune(self.slots, self.vt, now, self.rate))
            self.count -= dropped
            self.tombs += dropped

    def hotness(
        self,
        block_hashes: Sequence[int] | U64,
        matched: npt.NDArray[np.int64],
        lengths: Iterable[int] = (),
    ) -> npt.NDArray[np.float64]:
        """Decayed count at the deepest checkpoint of each slot's matched prefix (``matched``
        indexed by slot). ``lengths`` is accepted for compatibility and unused."""
        hot = np.zeros(len(matched), np.float64)
        if self.count:
            _hotness(self.keys, self.slots, self.vt, self.bits, as_hash_array(block_hashes),
                     matched, self._clock(), self.rate, hot)  # fmt: skip
        return hot

    def forget(self, slot: int, block_hashes: Iterable[int] | None = None) -> None:
        """Drop the slot's counts for evicted blocks (all of them when ``block_hashes`` is None)."""
        if not self.count:
            return
        if block_hashes is None:
            n = int(_drop_slot(self.keys, self.slots, slot))
        else:
            n = int(_forget(self.keys, self.slots, self.bits, as_hash_array(block_hashes), slot))
        self.count -= n
        self.tombs += n


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel once per process; idempotent."""
    t = AccessTracker(lambda: 1.0, max_entries=3, bits=3)
    h = np.arange(1, 9, dtype=np.uint64)
    for s in range(3):
        t.bump(s, h)  # NOTE: forces a rehash and a prune
    t.hotness(h, np.arange(4, dtype=np.int64))
    t.forget(0, h[:2])
    t.forget(1)
