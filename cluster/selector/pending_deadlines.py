"""PendingDeadlines: the deadline of every speculative insert, keyed by (block_hash, slot).

Layout (cap = 2^bits entries, open addressing on a mix of hash and slot, linear probing):

    keys  : uint64[cap]   block_hash
    slots : int64[cap]    0 empty, -1 tombstone, else slot + 1
    dl    : float64[cap]  deadline of the (block_hash, slot) mark

NOTE: this replaces a dict per slot (block_hash -> deadline): a Select marks ~100 blocks
pending on its winner and, once their TTL passes, another Select expires them; as Python dict
updates that was ~25 us of each Select, here it is one compiled call each way.
Contract: not thread-safe (the core serialises calls); arrays are replaced on growth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.selector.index_kernels import SINK, _jit

U64 = npt.NDArray[np.uint64]
MAX_LOAD = 0.7
_MIX = np.uint64(0xD6E8FEB86659FD93)
_FIB = np.uint64(0x9E3779B97F4A7C15)


@_jit
def _home(key: Any, slot: int, bits: int) -> Any:
    h = (key ^ (np.uint64(slot) * _MIX)) * _FIB
    return np.int64(h >> np.uint64(64 - bits))


@_jit
def _find(keys: Any, slots: Any, bits: int, key: Any, slot: int) -> int:
    m = np.int64((1 << bits) - 1)
    i: Any = _home(key, slot, bits)
    while True:
        s = slots[i]
        if s == 0:
            return -1
        if s == slot + 1 and keys[i] == key:
            return int(i)
        i = (i + 1) & m


@_jit
def _upsert(
    keys: Any, slots: Any, dl: Any, bits: int, hashes: Any, slot: int, deadline: float, sink: Any
) -> tuple[int, int]:
    """Set the deadline of (h, slot) for every h. Returns (entries created, tombs reused).
    ``sink``: see ``index_kernels.touch``."""
    m = np.int64((1 << bits) - 1)
    # NOTE: a prefetch of every home entry (see index_kernels.touch)
    acc = 0
    for j in range(hashes.shape[0]):
        acc ^= slots[_home(hashes[j], slot, bits)]
    sink[0] ^= np.uint64(acc)
    created = reused = 0
    for j in range(hashes.shape[0]):
        key = hashes[j]
        i: Any = _home(key, slot, bits)
        tomb = -1
        while True:
            s = slots[i]
            if s == 0:
                if tomb >= 0:
                    i = tomb
                    reused += 1
                keys[i], slots[i] = key, slot + 1
                created += 1
                break
            if s == slot + 1 and keys[i] == key:
                break
            if s == -1 and tomb < 0:
                tomb = i
            i = (i + 1) & m
        dl[i] = deadline
    return created, reused


@_jit
def _expire(
    keys: Any, slots: Any, dl: Any, bits: int, hashes: Any, slot: int, now: float, out: Any
) -> int:
    """Delete (h, slot) entries due by ``now``; their hashes go to ``out``; returns how many."""
    n = 0
    for j in range(hashes.shape[0]):
        i = _find(keys, slots, bits, hashes[j], slot)
        if i >= 0 and dl[i] <= now:
            slots[i] = -1
            out[n] = hashes[j]
            n += 1
    return n


@_jit
def _drop_slot(keys: Any, slots: Any, slot: int) -> Any:
    """Delete every entry of ``slot``; returns their hashes."""
    n = 0
    for i in range(slots.shape[0]):
        if slots[i] == slot + 1:
            n += 1
    out = np.empty(n, np.uint64)
    n = 0
    for i in range(slots.shape[0]):
        if slots[i] == slot + 1:
            out[n] = keys[i]
            slots[i] = -1
            n += 1
    return out


@_jit
def _rehash(
    keys: Any, slots: Any, dl: Any, nkeys: Any, nslots: Any, ndl: Any, nbits: int, sink: Any
) -> None:
    for i in range(slots.shape[0]):
        if slots[i] > 0:
            one = keys[i : i + 1]
            _upsert(nkeys, nslots, ndl, nbits, one, slots[i] - 1, dl[i], sink)


class PendingDeadlines:
    """(block_hash, slot) -> deadline; see the module docstring."""

    def __init__(self, bits: int = 10) -> None:
        self._alloc(bits)
        self.count = 0
        self.tombs = 0

    def _alloc(self, bits: int) -> None:
        self.bits = bits
        self.keys = np.zeros(1 << bits, np.uint64)
        self.slots = np.zeros(1 << bits, np.int64)
        self.dl = np.zeros(1 << bits, np.float64)

    def _reserve(self, num_new: int) -> None:
        if self.count + self.tombs + num_new <= MAX_LOAD * len(self.keys):
            return
        bits = self.bits
        while self.count + num_new > MAX_LOAD * (1 << bits) / 1.5:
            bits += 1
        old = (self.keys, self.slots, self.dl)
        self._alloc(bits)
        _rehash(*old, self.keys, self.slots, self.dl, bits, SINK)
        self.tombs = 0

    def set(self, hashes: U64, slot: int, deadline: float) -> int:
        """Deadline of (h, slot) := ``deadline`` for every h; returns how many were new."""
        self._reserve(len(hashes))
        created, reused = _upsert(
            self.keys, self.slots, self.dl, self.bits, hashes, slot, deadline, SINK
        )
        self.count += int(created)
        self.tombs -= int(reused)
        return int(created)

    def expire(self, hashes: U64, slot: int, now: float) -> U64:
        """Delete the (h, slot) entries due by ``now``; returns their hashes."""
        out = np.empty(len(hashes), np.uint64)
        n = int(_expire(self.keys, self.slots, self.dl, self.bits, hashes, slot, now, out))
        self.count -= n
        self.tombs += n
        return out[:n]

    def drop_slot(self, slot: int) -> U64:
        """Delete every entry of ``slot``; returns their hashes."""
        out: U64 = _drop_slot(self.keys, self.slots, slot)
        self.count -= len(out)
        self.tombs += len(out)
        return out


def warm_up() -> None:
    t = PendingDeadlines(bits=3)
    h = np.arange(1, 8, dtype=np.uint64)
    t.set(h, 1, 1.0)  # NOTE: 7 keys into 8 rows: forces a rehash
    t.expire(h[:2], 1, 2.0)
    t.drop_slot(1)
