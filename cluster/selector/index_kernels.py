"""Compiled (numba) loops of the KV index: the hashing, prefetch and backward-shift helpers its
tables share, and the open-addressing probes over ``MaskTable`` arrays (the pending marks;
the resident tiers' 16-byte rows are ``holder_kernels``, the Select walk ``walk_kernel``).

NOTE: numba, not Rust or Cython: it ships as a wheel (no toolchain on a fresh machine or in CI),
compiles these few loops at first use (cached on disk), and keeps one source of truth in Python
syntax. Profiling showed the Select walk (128 dict lookups of 256-bit ints over a 12.8M-entry
dict) was ~60% of the old index's cost; here it is a few microseconds.

Table rows (``MaskTable``): ``[key, mask word 0, ..., mask word W-1]`` as uint64. A row is
live when its mask is non-zero, empty otherwise (any key value is a valid hash). Hash:
Fibonacci multiply, top ``bits`` bits. Linear probing with backward-shift deletion (Knuth's
Algorithm R): no tombstones, so probe runs stay as short as the live load allows and a table
never needs a same-size rebuild (NOTE: with tombstones, the pending table's churn of ~64
marks per Select forced a full rehash every few thousand Selects, 15-30 ms each at 256
replicas, and lengthened every miss probe of the walk).
Every function is pure over its array arguments (mutating only the ones it documents).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numba
import numpy as np

from cluster.selector import kernel_cache

F = TypeVar("F", bound=Callable[..., Any])

_MULT = np.uint64(0x9E3779B97F4A7C15)


def _jit(fn: F) -> F:
    return cast(F, numba.njit(cache=True, nogil=True)(fn))


def zeros(shape: int | tuple[int, ...], dtype: Any) -> Any:
    """``np.zeros`` with every page written now.
    NOTE: np.zeros of a big array maps zero pages lazily; each first write then faults in the
    middle of whatever Select touches it (measured here: ~4 ms stalls, dozens of them in the
    first thousand Selects after a table grew). Growth is the slow path already: pay there."""
    out = np.empty(shape, dtype)
    out.fill(0)
    return out


@_jit
def _home(key: Any, bits: int) -> Any:
    h = key * _MULT
    return np.int64(h >> np.uint64(64 - bits))


# NOTE: where ``touch`` leaves its value (see there); never read. An argument, not a global:
# numba freezes global arrays into read-only constants.
SINK = np.zeros(1, np.uint64)


@_jit
def touch(tab: Any, bits: int, hashes: Any, sink: Any) -> None:
    """Read the home row of every hash (a prefetch); ``sink[0]`` gets a meaningless value.

    NOTE: the walk's probes are serial (each waits on its cache miss: ~350 ns on this box at
    16M rows, so a 128-block prefix cost ~45 us). These loads are independent, so the CPU
    overlaps them (~3 us for 128) and the probes that follow mostly hit cache. The store to
    ``sink`` keeps LLVM from dropping the loads as dead code."""
    acc = np.uint64(0)
    for j in range(hashes.shape[0]):
        acc ^= tab[_home(hashes[j], bits), 0]
    sink[0] ^= acc


# NOTE: rows past the home row that ``touch_run`` loads too (see there)
RUN_AHEAD = 2


@_jit
def touch_run(tab: Any, bits: int, hashes: Any, sink: Any) -> None:
    """``touch`` for ``MaskTable`` rows (40 B at 256 slots): the home row and the ends of the
    next ``RUN_AHEAD`` rows, so a probe run and the backward shift of a delete find their
    rows in cache too.
    NOTE: at the pending table's steady load (a Select marks ~64 blocks and expires as many)
    a clear's probe and shift cover ~3-4 rows, 2-3 cache lines of which ``touch`` loaded
    one; measured at 256 x 100k: the expiry's pending clears 15 -> 12 us a Select, marking
    ~7 -> ~6 (2 rows ahead; 4 gave nothing more)."""
    acc = np.uint64(0)
    m = np.int64((1 << bits) - 1)
    last = tab.shape[1] - 1
    for j in range(hashes.shape[0]):
        i = _home(hashes[j], bits)
        acc ^= tab[i, 0]
        for d in range(1, RUN_AHEAD + 1):
            acc ^= tab[(i + d) & m, last]
    sink[0] ^= acc


@_jit
def _live(tab: Any, i: int) -> bool:
    for w in range(1, tab.shape[1]):  # noqa: SIM110  (numba: no generators)
        if tab[i, w] != 0:
            return True
    return False


@_jit
def find(tab: Any, bits: int, key: Any) -> int:
    """Row of ``key`` (uint64) or -1."""
    m = np.int64((1 << bits) - 1)
    i: Any = _home(key, bits)
    while _live(tab, i):
        if tab[i, 0] == key:
            return int(i)
        i = (i + 1) & m
    return -1


@_jit
def _find_or_insert(tab: Any, bits: int, key: Any) -> tuple[int, int]:
    """(row, created) for ``key``. A created row has an all-zero mask: the caller must set a
    bit before the next probe of this table."""
    m = np.int64((1 << bits) - 1)
    i = _home(key, bits)
    while _live(tab, i):
        if tab[i, 0] == key:
            return i, 0
        i = (i + 1) & m
    tab[i, 0] = key
    return i, 1


@_jit
def _moves_back(i: int, j: int, home: int) -> bool:
    """Backward shift: may the entry at row ``j`` (home row ``home``) fill the hole at ``i``?
    Yes unless its home lies cyclically in (i, j]."""
    if i <= j:
        return home <= i or home > j
    return home <= i and home > j


@_jit
def delete_row(tab: Any, bits: int, i: int) -> None:
    """Empty row ``i`` and shift later rows of its probe run back (no tombstone)."""
    m = np.int64((1 << bits) - 1)
    nw = tab.shape[1]
    j: Any = i
    while True:
        j = (j + 1) & m
        if not _live(tab, j):
            break
        if _moves_back(i, j, _home(tab[j, 0], bits)):
            # NOTE: word loops, not ``tab[i, :] = tab[j, :]``: numba builds two views and a
            # broadcast copy per slice assignment; the expiry's pending clears 12 -> 10.5 us
            # a Select (256 x 100k)
            for w in range(nw):
                tab[i, w] = tab[j, w]
            i = j
    for w in range(nw):
        tab[i, w] = 0


@_jit
def set_bits(tab: Any, bits: int, hashes: Any, slot: int, sink: Any) -> tuple[int, int]:
    """Set ``slot`` on every hash (uint64). Returns (bits newly set, keys created).
    ``sink``: see ``touch`` (``touch_run`` here)."""
    w, b = 1 + (slot >> 6), np.uint64(1) << np.uint64(slot & 63)
    touch_run(tab, bits, hashes, sink)
    added = created = 0
    for j in range(hashes.shape[0]):
        i, c = _find_or_insert(tab, bits, hashes[j])
        created += c
        if tab[i, w] & b == 0:
            tab[i, w] |= b
            added += 1
    return added, created


@_jit
def _clear(tab: Any, bits: int, i: int, w: int, b: Any) -> int:
    """Clear one bit of live row i; 1 when the row empties (it is deleted)."""
    tab[i, w] &= ~b
    if _live(tab, i):
        return 0
    delete_row(tab, bits, i)
    return 1


@_jit
def clear_bits(tab: Any, bits: int, hashes: Any, slot: int, sink: Any) -> tuple[int, int]:
    """Clear ``slot`` on every hash. Returns (bits cleared, keys deleted). ``sink``: see
    ``touch``."""
    w, b = 1 + (slot >> 6), np.uint64(1) << np.uint64(slot & 63)
    touch_run(tab, bits, hashes, sink)
    cleared = deleted = 0
    for j in range(hashes.shape[0]):
        i = find(tab, bits, hashes[j])
        if i < 0 or tab[i, w] & b == 0:
            continue
        cleared += 1
        deleted += _clear(tab, bits, i, w, b)
    return cleared, deleted


@_jit
def clear_slot(tab: Any, bits: int, slot: int) -> int:
    """Clear ``slot`` everywhere (a full scan). Returns keys deleted.
    NOTE: a deletion may shift a later row into row i, so row i is looked at again; rows
    shifted from the wrapped start into the end were handled already (clearing is
    idempotent)."""
    w, b = 1 + (slot >> 6), np.uint64(1) << np.uint64(slot & 63)
    deleted = 0
    i, n = 0, tab.shape[0]
    while i < n:
        if tab[i, w] & b and _clear(tab, bits, i, w, b):
            deleted += 1
            continue
        i += 1
    return deleted


@_jit
def has_bit(tab: Any, bits: int, key: Any, slot: int) -> bool:
    i = find(tab, bits, key)
    return i >= 0 and (tab[i, 1 + (slot >> 6)] >> np.uint64(slot & 63)) & np.uint64(1) == 1


@_jit
def count_missing(tab: Any, other: Any, obits: int) -> int:
    """Live keys of ``tab`` that ``other`` does not hold."""
    n = 0
    for i in range(tab.shape[0]):
        if _live(tab, i) and find(other, obits, tab[i, 0]) < 0:
            n += 1
    return n


@_jit
def rehash(tab: Any, new: Any, nbits: int) -> None:
    """Copy every live row into the (all-zero) ``new`` table."""
    for i in range(tab.shape[0]):
        if _live(tab, i):
            j, _ = _find_or_insert(new, nbits, tab[i, 0])
            new[j, 1:] = tab[i, 1:]


@_jit
def mask_from_slots(slots: Any, num_words: int) -> Any:
    out = np.zeros(num_words, np.uint64)
    for s in slots:
        out[s >> 6] |= np.uint64(1) << np.uint64(s & 63)
    return out


# NOTE: every kernel module imports this one before any kernel is first called (and loaded
# from numba's cache): stale cached kernels go here, once per process (kernel_cache).
kernel_cache.ensure_fresh(_home, Path(__file__).resolve().parent)
