"""PendingDeadlines: the deadline of every speculative insert, keyed by (block_hash, slot).

Layout (cap = 2^bits entries, open addressing on a mix of hash and slot, linear probing):

    keys  : uint64[cap]   block_hash
    slots : int64[cap]    0 empty, else slot + 1
    dl    : float64[cap]  deadline of the (block_hash, slot) mark

Deletion shifts the probe run back (no tombstones, as in ``holder_kernels.delete_row``): a
Select marks ~100 blocks and expires about as many, so tombstones forced a full rebuild every
few thousand Selects.
NOTE: this replaces a dict per slot (block_hash -> deadline): a Select marks ~100 blocks
pending on its winner and, once their TTL passes, another Select expires them; as Python dict
updates that was ~25 us of each Select, here it is one compiled call each way.
Contract: not thread-safe (the core serialises calls); arrays are replaced on growth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.selector.generation import bump
from cluster.selector.index_kernels import SINK, _jit, _moves_back, zeros

U64 = npt.NDArray[np.uint64]
# NOTE: at most half full (0.7 before): every Select deletes ~64 marks and inserts as many, and
# a backward-shift delete and an insert probe to the end of their run; at 320k marks (2,500
# Selects/s x 2 s) 0.61 full became 0.31 (one table doubling, 12 -> 24 MiB), the route's p50
# ~30 -> ~26 us hot (benchmarks/README.md, "Fourteenth pass")
MAX_LOAD = 0.5
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
def _touch(keys: Any, slots: Any, dl: Any, bits: int, hashes: Any, slot: int, sink: Any) -> None:
    """Load the home entry of every (h, slot) in all three arrays (a prefetch, see
    ``index_kernels.touch``).
    NOTE: all three, not only ``slots``: an upsert then writes ``keys`` and ``dl`` and an
    expiry reads them, each a miss in its own array at ~650k marks (a Select's ~64 of them
    otherwise serialise behind the store buffer)."""
    acc = np.uint64(0)
    for j in range(hashes.shape[0]):
        i = _home(hashes[j], slot, bits)
        acc ^= keys[i] ^ np.uint64(slots[i]) ^ np.uint64(np.int64(dl[i]))
    sink[0] ^= acc


@_jit
def _upsert(
    keys: Any, slots: Any, dl: Any, bits: int, hashes: Any, slot: int, deadline: float, sink: Any
) -> int:
    """Set the deadline of (h, slot) for every h. Returns the entries created.
    ``sink``: see ``index_kernels.touch``."""
    m = np.int64((1 << bits) - 1)
    _touch(keys, slots, dl, bits, hashes, slot, sink)
    created = 0
    for j in range(hashes.shape[0]):
        key = hashes[j]
        i: Any = _home(key, slot, bits)
        while True:
            s = slots[i]
            if s == 0:
                keys[i], slots[i] = key, slot + 1
                created += 1
                break
            if s == slot + 1 and keys[i] == key:
                break
            i = (i + 1) & m
        dl[i] = deadline
    return created


@_jit
def _delete(keys: Any, slots: Any, dl: Any, bits: int, i: int) -> None:
    """Empty entry ``i`` and shift later entries of its probe run back."""
    m = np.int64((1 << bits) - 1)
    j: Any = i
    while True:
        j = (j + 1) & m
        s = slots[j]
        if s == 0:
            break
        if _moves_back(i, j, _home(keys[j], s - 1, bits)):
            keys[i], slots[i], dl[i] = keys[j], s, dl[j]
            i = j
    slots[i] = 0


@_jit
def _expire(
    keys: Any, slots: Any, dl: Any, bits: int, hashes: Any, slot: int, now: float, out: Any,
    sink: Any,
) -> int:  # fmt: skip
    """Delete (h, slot) entries due by ``now``; their hashes go to ``out``; returns how many."""
    _touch(keys, slots, dl, bits, hashes, slot, sink)
    n = 0
    for j in range(hashes.shape[0]):
        i = _find(keys, slots, bits, hashes[j], slot)
        if i >= 0 and dl[i] <= now:
            _delete(keys, slots, dl, bits, i)
            out[n] = hashes[j]
            n += 1
    return n


@_jit
def _drop_slot(keys: Any, slots: Any, dl: Any, bits: int, slot: int) -> Any:
    """Delete every entry of ``slot``; returns their hashes (see ``holder_kernels.clear_slot``
    for why a row is looked at again after a deletion)."""
    n = 0
    for i in range(slots.shape[0]):
        if slots[i] == slot + 1:
            n += 1
    out = np.empty(n, np.uint64)
    n, i = 0, 0
    while i < slots.shape[0]:
        if slots[i] == slot + 1:
            out[n] = keys[i]
            n += 1
            _delete(keys, slots, dl, bits, i)
            continue
        i += 1
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

    def _alloc(self, bits: int) -> None:
        self.bits = bits
        self.keys = zeros(1 << bits, np.uint64)
        self.slots = zeros(1 << bits, np.int64)
        self.dl = zeros(1 << bits, np.float64)
        bump()

    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more entries without another doubling."""
        if self.count + num_new <= MAX_LOAD * len(self.keys):
            return
        bits = self.bits
        while self.count + num_new > MAX_LOAD * (1 << bits) / 1.5:
            bits += 1
        old = (self.keys, self.slots, self.dl)
        self._alloc(bits)
        _rehash(*old, self.keys, self.slots, self.dl, bits, SINK)

    def set(self, hashes: U64, slot: int, deadline: float) -> int:
        """Deadline of (h, slot) := ``deadline`` for every h; returns how many were new."""
        self.reserve(len(hashes))
        created = int(_upsert(self.keys, self.slots, self.dl, self.bits, hashes, slot, deadline,
                              SINK))  # fmt: skip
        self.count += created
        return created

    def expire(self, hashes: U64, slot: int, now: float) -> U64:
        """Delete the (h, slot) entries due by ``now``; returns their hashes."""
        out = np.empty(len(hashes), np.uint64)
        n = int(_expire(self.keys, self.slots, self.dl, self.bits, hashes, slot, now, out, SINK))
        self.count -= n
        return out[:n]

    def drop_slot(self, slot: int) -> U64:
        """Delete every entry of ``slot``; returns their hashes."""
        out: U64 = _drop_slot(self.keys, self.slots, self.dl, self.bits, slot)
        self.count -= len(out)
        return out


def warm_up() -> None:
    t = PendingDeadlines(bits=3)
    h = np.arange(1, 8, dtype=np.uint64)
    t.set(h, 1, 1.0)  # NOTE: 7 keys into 8 rows: forces a rehash
    t.expire(h[:2], 1, 2.0)
    t.drop_slot(1)
