"""Compiled (numba) helpers every table of the KV index shares: the decorator, page-touching
zeros, Fibonacci hashing of a key to its home row, the home-row prefetch (``touch``), the
backward-shift test and candidate mask words. The tables' own probes are ``holder_kernels``
(the resident tiers and the pending marks, 16-byte rows), ``pending_rows`` (the pending marks'
compiled mark / unmark), ``pending_deadlines`` and ``access``; the Select walk ``walk_kernel``.

NOTE: numba, not Rust or Cython: it ships as a wheel (no toolchain on a fresh machine or in CI),
compiles these few loops at first use (cached on disk), and keeps one source of truth in Python
syntax. Profiling showed the Select walk (128 dict lookups of 256-bit ints over a 12.8M-entry
dict) was ~60% of the old index's cost; here it is a few microseconds.

Every table: Fibonacci multiply, top ``bits`` bits, linear probing with backward-shift
deletion (Knuth's Algorithm R): no tombstones, so probe runs stay as short as the live load
allows and a table never needs a same-size rebuild (NOTE: with tombstones, the pending table's
churn of ~64 marks per Select forced a full rehash every few thousand Selects, 15-30 ms each
at 256 replicas, and lengthened every miss probe of the walk).
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


@_jit
def _moves_back(i: int, j: int, home: int) -> bool:
    """Backward shift: may the entry at row ``j`` (home row ``home``) fill the hole at ``i``?
    Yes unless its home lies cyclically in (i, j]."""
    if i <= j:
        return home <= i or home > j
    return home <= i and home > j


@_jit
def mask_from_slots(slots: Any, num_words: int) -> Any:
    out = np.zeros(num_words, np.uint64)
    for s in slots:
        out[s >> 6] |= np.uint64(1) << np.uint64(s & 63)
    return out


# NOTE: every kernel module imports this one before any kernel is first called (and loaded
# from numba's cache): stale cached kernels go here, once per process (kernel_cache).
kernel_cache.ensure_fresh(_home, Path(__file__).resolve().parent)
