"""Compiled (numba) loops of ``HolderTable``: block_hash -> the slots holding it, in 16-byte rows
with up to three slot ids inline and a mask row in an overflow pool for blocks held by more.

Row layout (``tab``: uint64[cap, 2]; ``over``: uint64[ocap, W] holder masks, bit s = slot s):

    tab[i] = [ block_hash | holders ]
    holders == 0                   empty row (any key value is a valid hash)
    holders bit 63 == 0 (inline)   1-3 holders: field f (bits 21f .. 21f+20) = slot + 1, used
                                   fields first (0 = unused)
    holders bit 63 == 1 (overflow) 4+ holders: bits 0..31 = row o of ``over``; over[o] = mask

    63 62     42 41     21 20      0
    +-+---------+---------+---------+
    |0| slot2+1 | slot1+1 | slot0+1 |  inline (unused fields 0)
    +-+---------+---------+---------+

    63 62          32 31            0
    +-+--------------+--------------+
    |1|      (0)     |overflow row o|  overflow
    +-+--------------+--------------+

Invariant: a row is inline iff it has at most 3 holders (a 4th moves it to an overflow row, a
drop back to 3 moves it inline and frees the row), so every holder set has one encoding.
Free overflow rows form a list threaded through their word 0 (``next + 1``; 0 ends it);
``ostate`` = [first free row or -1, overflow rows in use].

Probing (Fibonacci hash, linear probing, backward-shift deletes) is ``index_kernels``': the
row width is the only difference. Every function is pure over its array arguments (mutating
only the ones it documents). NOTE: a probe reads 16 B rows, four to a cache line, where a
``MaskTable`` row at 256 slots is 40 B.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster.selector.index_kernels import _home, _jit, _moves_back, touch

NUM_INLINE = 3
FIELD_BITS = 21
MAX_SLOT = (1 << FIELD_BITS) - 2  # field value slot + 1 must fit in 21 bits
_FMASK = np.uint64((1 << FIELD_BITS) - 1)
_OVER = np.uint64(1 << 63)
_OROW = np.uint64((1 << 32) - 1)
_ONE = np.uint64(1)
_ONES = np.uint64(1 | 1 << FIELD_BITS | 1 << 2 * FIELD_BITS)  # the low bit of every field
_HIGHS = _ONES << np.uint64(FIELD_BITS - 1)  # the high bit of every field


@_jit
def _bit(slot: int) -> Any:
    return _ONE << np.uint64(slot & 63)


@_jit
def _field(p: Any, f: int) -> Any:
    return (p >> np.uint64(FIELD_BITS * f)) & _FMASK


@_jit
def find(tab: Any, bits: int, key: Any) -> int:
    """Row of ``key`` (uint64) or -1."""
    m = np.int64((1 << bits) - 1)
    i: Any = _home(key, bits)
    while tab[i, 1] != 0:
        if tab[i, 0] == key:
            return int(i)
        i = (i + 1) & m
    return -1


@_jit
def _find_or_insert(tab: Any, bits: int, key: Any) -> tuple[int, int]:
    """(row, created). A created row has no holders: the caller must add one before the next
    probe of this table."""
    m = np.int64((1 << bits) - 1)
    i = _home(key, bits)
    while tab[i, 1] != 0:
        if tab[i, 0] == key:
            return i, 0
        i = (i + 1) & m
    tab[i, 0] = key
    return i, 1


@_jit
def delete_row(tab: Any, bits: int, i: int) -> None:
    """Empty row ``i`` and shift later rows of its probe run back (no tombstone). Overflow rows
    are referenced by index, so moving a row moves its reference with it."""
    m = np.int64((1 << bits) - 1)
    j: Any = i
    while True:
        j = (j + 1) & m
        if tab[j, 1] == 0:
            break
        if _moves_back(i, j, _home(tab[j, 0], bits)):
            tab[i, 0] = tab[j, 0]
            tab[i, 1] = tab[j, 1]
            i = j
    tab[i, 0] = 0
    tab[i, 1] = 0


@_jit
def holds(tab: Any, over: Any, i: int, slot: int) -> bool:
    """Does live row ``i`` list ``slot``?"""
    p = tab[i, 1]
    if p & _OVER:
        return bool(over[np.int64(p & _OROW), slot >> 6] & _bit(slot) != 0)
    v = np.uint64(slot + 1)
    for f in range(NUM_INLINE):
        x = _field(p, f)
        if x == v:
            return True
        if x == 0:
            return False
    return False


@_jit
def holder_words(tab: Any, over: Any, i: int, out: Any) -> None:
    """``out[w]`` = word w of row ``i``'s holder mask (all zero when ``i < 0``); ``out`` has
    the table's W words or fewer."""
    nw = out.shape[0]
    if i >= 0 and tab[i, 1] & _OVER:
        o = np.int64(tab[i, 1] & _OROW)
        for w in range(nw):
            out[w] = over[o, w]
        return
    for w in range(nw):
        out[w] = 0
    if i < 0:
        return
    p = tab[i, 1]
    for f in range(NUM_INLINE):
        x = _field(p, f)
        if x == 0:
            break
        s = np.int64(x) - 1
        out[s >> 6] |= _bit(int(s))


@_jit
def _add(tab: Any, over: Any, ostate: Any, i: int, slot: int) -> int:
    """Add ``slot`` to live (or just created) row ``i``: 1 added, 0 held already, -1 a 4th
    holder needs an overflow row and none is free (nothing changed)."""
    p = tab[i, 1]
    b = _bit(slot)
    if p & _OVER:
        o = np.int64(p & _OROW)
        if over[o, slot >> 6] & b:
            return 0
        over[o, slot >> 6] |= b
        return 1
    v = np.uint64(slot + 1)
    for f in range(NUM_INLINE):
        x = _field(p, f)
        if x == v:
            return 0
        if x == 0:
            tab[i, 1] = p | (v << np.uint64(FIELD_BITS * f))
            return 1
    o = ostate[0]
    if o < 0:
        return -1
    ostate[0] = np.int64(over[o, 0]) - 1
    ostate[1] += 1
    over[o, :] = 0
    for f in range(NUM_INLINE):
        s = np.int64(_field(p, f)) - 1
        over[o, s >> 6] |= _bit(int(s))
    over[o, slot >> 6] |= b
    tab[i, 1] = _OVER | np.uint64(o)
    return 1


@_jit
def _to_inline(tab: Any, over: Any, ostate: Any, i: int, o: int) -> None:
    """Row ``i`` (overflow row ``o``, at most 3 holders left) back to inline; frees ``o``."""
    p = np.uint64(0)
    f = 0
    for w in range(over.shape[1]):
        m = over[o, w]
        b = 0
        while m:
            if m & _ONE:
                p |= np.uint64(64 * w + b + 1) << np.uint64(FIELD_BITS * f)
                f += 1
            m >>= _ONE
            b += 1
    tab[i, 1] = p
    over[o, 0] = np.uint64(ostate[0] + 1)
    ostate[0] = o
    ostate[1] -= 1


@_jit
def _drop(tab: Any, over: Any, ostate: Any, i: int, slot: int) -> int:
    """Remove ``slot`` from live row ``i``: 1 removed, 0 not a holder. The row may be left
    with no holders (``tab[i, 1] == 0``): the caller deletes it."""
    p = tab[i, 1]
    if p & _OVER:
        o = np.int64(p & _OROW)
        b = _bit(slot)
        if over[o, slot >> 6] & b == 0:
            return 0
        over[o, slot >> 6] &= ~b
        n = 0
        for w in range(over.shape[1]):
            m = over[o, w]
            while m and n <= NUM_INLINE:
                m &= m - _ONE
                n += 1
        if n <= NUM_INLINE:
            _to_inline(tab, over, ostate, i, int(o))
        return 1
    v = np.uint64(slot + 1)
    k = last = -1
    for f in range(NUM_INLINE):
        x = _field(p, f)
        if x == 0:
            break
        if x == v:
            k = f
        last = f
    if k < 0:
        return 0
    # NOTE: the last used field moves into the hole, so used fields stay first
    moved = _field(p, last)
    p &= ~(_FMASK << np.uint64(FIELD_BITS * last))
    if k != last:
        p = (p & ~(_FMASK << np.uint64(FIELD_BITS * k))) | (moved << np.uint64(FIELD_BITS * k))
    tab[i, 1] = p
    return 1


@_jit
def set_slot(
    tab: Any, bits: int, over: Any, ostate: Any, hashes: Any, slot: int, start: int, sink: Any
) -> tuple[int, int, int]:
    """Add ``slot`` to every hash of ``hashes[start:]`` (uint64), inserting new keys. Returns
    (holders added, keys created, next): ``next < len(hashes)`` when the overflow pool ran out
    of free rows at ``hashes[next]`` (nothing done for it): grow the pool, call again from
    there. The table must have room for every new key. ``sink``: see ``index_kernels.touch``."""
    touch(tab, bits, hashes[start:], sink)
    return add_all(tab, bits, over, ostate, hashes, slot, start)


@_jit
def add_all(
    tab: Any, bits: int, over: Any, ostate: Any, hashes: Any, slot: int, start: int
) -> tuple[int, int, int]:
    """``set_slot`` without its prefetch (the caller made its own)."""
    added = created = 0
    for j in range(start, hashes.shape[0]):
        i, c = _find_or_insert(tab, bits, hashes[j])
        r = _add(tab, over, ostate, i, slot)
        if r < 0:
            return added, created, j
        created += c
        added += r
    return added, created, hashes.shape[0]


@_jit
def clear_slot_of(
    tab: Any, bits: int, over: Any, ostate: Any, hashes: Any, slot: int, sink: Any
) -> tuple[int, int]:
    """Remove ``slot`` from every hash (unknown hashes ignored); rows left with no holder are
    deleted. Returns (holders removed, keys deleted). ``sink``: see ``index_kernels.touch``."""
    touch(tab, bits, hashes, sink)
    return drop_all(tab, bits, over, ostate, hashes, slot)


@_jit
def drop_all(
    tab: Any, bits: int, over: Any, ostate: Any, hashes: Any, slot: int
) -> tuple[int, int]:
    """``clear_slot_of`` without its prefetch (the caller made its own)."""
    removed = deleted = 0
    for j in range(hashes.shape[0]):
        i = find(tab, bits, hashes[j])
        if i < 0 or not _drop(tab, over, ostate, i, slot):
            continue
        removed += 1
        if tab[i, 1] == 0:
            delete_row(tab, bits, i)
            deleted += 1
    return removed, deleted


@_jit
def clear_slot(tab: Any, bits: int, over: Any, ostate: Any, slot: int) -> int:
    """Remove ``slot`` everywhere (a full scan). Returns keys deleted.
    NOTE: a deletion may shift a later row into row i, so row i is looked at again; rows
    shifted from the wrapped start into the end were handled already (removal is
    idempotent)."""
    deleted = 0
    rep = np.uint64(slot + 1) * _ONES
    i, n = 0, tab.shape[0]
    while i < n:
        p = tab[i, 1]
        # NOTE: a branch-free test of the three fields at once (a field of p ^ rep is zero
        # where it holds the slot: the "has a zero byte" trick on 21-bit fields), ``_drop``
        # only on a hit or an overflow row. Calling ``_drop`` on every live row made a leave
        # at 16.8M rows ~10x slower than the mask table's one-word test (430 vs 41 ms).
        x = p ^ rep
        if (x - _ONES) & ~x & _HIGHS == 0 and p & _OVER == 0:
            i += 1
            continue
        if _drop(tab, over, ostate, i, slot) and tab[i, 1] == 0:
            delete_row(tab, bits, i)
            deleted += 1
            continue
        i += 1
    return deleted


@_jit
def has_slot(tab: Any, bits: int, over: Any, key: Any, slot: int) -> bool:
    i = find(tab, bits, key)
    return i >= 0 and holds(tab, over, i, slot)


@_jit
def count_missing(tab: Any, other: Any, obits: int) -> int:
    """Live keys of ``tab`` that ``other`` (a holder table) does not hold."""
    n = 0
    for i in range(tab.shape[0]):
        if tab[i, 1] != 0 and find(other, obits, tab[i, 0]) < 0:
            n += 1
    return n


@_jit
def rehash(tab: Any, new: Any, nbits: int) -> None:
    """Copy every live row into the (all-zero) ``new`` table (overflow rows stay where they
    are: rows reference them by index)."""
    for i in range(tab.shape[0]):
        if tab[i, 1] != 0:
            j, _ = _find_or_insert(new, nbits, tab[i, 0])
            new[j, 1] = tab[i, 1]
