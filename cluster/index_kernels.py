"""Compiled (numba) loops of the KV index: open-addressing probes over ``MaskTable`` arrays and
the longest-prefix walk of a Select.

NOTE: numba, not Rust or Cython: it ships as a wheel (no toolchain on a fresh machine or in CI),
compiles these few loops at first use (cached on disk), and keeps one source of truth in Python
syntax. Profiling showed the Select walk (128 dict lookups of 256-bit ints over a 12.8M-entry
dict) was ~60% of the old index's cost; here it is a few microseconds.

Table states: EMPTY 0, FULL 1, TOMB 2. Hash: Fibonacci multiply, top ``bits`` bits.
Every function is pure over its array arguments (mutating only the ones it documents).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba  # type: ignore[import-untyped]
import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

EMPTY, FULL, TOMB = 0, 1, 2
_MULT = np.uint64(0x9E3779B97F4A7C15)


def _jit(fn: F) -> F:
    return cast(F, numba.njit(cache=True, nogil=True)(fn))


@_jit
def _home(key: int, bits: int) -> int:
    h = np.uint64(key) * _MULT
    return np.int64(h >> np.uint64(64 - bits))


@_jit
def find(keys: Any, state: Any, bits: int, key: int) -> int:
    """Row of ``key`` or -1."""
    m = np.int64((1 << bits) - 1)
    i = _home(key, bits)
    while True:
        s = state[i]
        if s == EMPTY:
            return -1
        if s == FULL and keys[i] == key:
            return i
        i = (i + 1) & m


@_jit
def _find_or_insert(keys: Any, state: Any, bits: int, key: int) -> tuple[int, int, int]:
    """(row, created, reused tombstone) for ``key``; a new key takes the first tombstone."""
    m = np.int64((1 << bits) - 1)
    i = _home(key, bits)
    tomb = -1
    while True:
        s = state[i]
        if s == EMPTY:
            if tomb >= 0:
                keys[tomb] = key
                state[tomb] = FULL
                return tomb, 1, 1
            keys[i] = key
            state[i] = FULL
            return i, 1, 0
        if s == FULL and keys[i] == key:
            return i, 0, 0
        if s == TOMB and tomb < 0:
            tomb = i
        i = (i + 1) & m


@_jit
def set_bits(
    keys: Any, state: Any, masks: Any, bits: int, hashes: Any, slot: int
) -> tuple[int, int, int]:
    """Set ``slot`` on every hash. Returns (bits newly set, keys created, tombstones reused)."""
    w, b = slot >> 6, np.uint64(1) << np.uint64(slot & 63)
    added = created = reused = 0
    for j in range(hashes.shape[0]):
        i, c, r = _find_or_insert(keys, state, bits, hashes[j])
        created += c
        reused += r
        if masks[i, w] & b == 0:
            masks[i, w] |= b
            added += 1
    return added, created, reused


@_jit
def _empty(masks: Any, i: int) -> bool:
    for w in range(masks.shape[1]):
        if masks[i, w] != 0:
            return False
    return True


@_jit
def clear_bits(
    keys: Any, state: Any, masks: Any, bits: int, hashes: Any, slot: int
) -> tuple[int, int]:
    """Clear ``slot`` on every hash. Returns (bits cleared, keys deleted)."""
    w, b = slot >> 6, np.uint64(1) << np.uint64(slot & 63)
    cleared = deleted = 0
    for j in range(hashes.shape[0]):
        i = find(keys, state, bits, hashes[j])
        if i < 0 or masks[i, w] & b == 0:
            continue
        masks[i, w] &= ~b
        cleared += 1
        if _empty(masks, i):
            state[i] = TOMB
            deleted += 1
    return cleared, deleted


@_jit
def clear_slot(keys: Any, state: Any, masks: Any, slot: int) -> tuple[Any, int]:
    """Clear ``slot`` everywhere. Returns (hashes it held, keys deleted)."""
    w, b = slot >> 6, np.uint64(1) << np.uint64(slot & 63)
    n = 0
    for i in range(keys.shape[0]):
        if state[i] == FULL and masks[i, w] & b:
            n += 1
    held = np.empty(n, np.int64)
    n = deleted = 0
    for i in range(keys.shape[0]):
        if state[i] == FULL and masks[i, w] & b:
            held[n] = keys[i]
            n += 1
            masks[i, w] &= ~b
            if _empty(masks, i):
                state[i] = TOMB
                deleted += 1
    return held, deleted


@_jit
def count_slot(state: Any, masks: Any, slot: int) -> int:
    w, b = slot >> 6, np.uint64(1) << np.uint64(slot & 63)
    n = 0
    for i in range(state.shape[0]):
        if state[i] == FULL and masks[i, w] & b:
            n += 1
    return n


@_jit
def has_bit(keys: Any, state: Any, masks: Any, bits: int, key: int, slot: int) -> bool:
    i = find(keys, state, bits, key)
    return i >= 0 and (masks[i, slot >> 6] >> np.uint64(slot & 63)) & np.uint64(1) == 1


@_jit
def count_missing(keys: Any, state: Any, okeys: Any, ostate: Any, obits: int) -> int:
    n = 0
    for i in range(keys.shape[0]):
        if state[i] == FULL and find(okeys, ostate, obits, keys[i]) < 0:
            n += 1
    return n


@_jit
def rehash(
    keys: Any, state: Any, masks: Any, nkeys: Any, nstate: Any, nmasks: Any, nbits: int
) -> None:
    """Copy every FULL entry into the (empty) new arrays."""
    for i in range(keys.shape[0]):
        if state[i] == FULL:
            j, _, _ = _find_or_insert(nkeys, nstate, nbits, keys[i])
            nmasks[j, :] = masks[i, :]


@_jit
def mask_from_slots(slots: Any, num_words: int) -> Any:
    out = np.zeros(num_words, np.uint64)
    for s in slots:
        out[s >> 6] |= np.uint64(1) << np.uint64(s & 63)
    return out


@_jit
def _leave(out: Any, w: int, gone: Any, n: int) -> None:
    """out[slot] = n for every slot whose bit is set in ``gone`` (word ``w``)."""
    b = 0
    while gone:
        if gone & np.uint64(1):
            out[w * 64 + b] = n
        gone >>= np.uint64(1)
        b += 1


@_jit
def walk(
    hashes: Any,
    gk: Any, gs: Any, gm: Any, gbits: int,
    ck: Any, cs: Any, cm: Any, cbits: int, use_cpu: bool,
    pk: Any, ps: Any, pm: Any, pbits: int, use_pending: bool,
    cand: Any,
    out_res: Any, out_both: Any, out_host: Any,
) -> None:  # fmt: skip
    """Longest exact prefix of ``hashes`` per candidate slot (``cand`` bitmask), in one pass.

    Writes, indexed by slot: ``out_res`` = leading blocks resident (device or host tier),
    ``out_both`` = leading blocks resident or pending, ``out_host`` = blocks of the resident
    prefix held on the host tier only. The outputs must be zero on entry.
    NOTE: the walk stops as soon as no candidate is left (a fresh suffix costs one probe)."""
    nw = cand.shape[0]
    alive_r = cand.copy()
    alive_b = cand.copy()
    n = hashes.shape[0]
    zero = np.uint64(0)
    for i in range(n):
        h = hashes[i]
        ig = find(gk, gs, gbits, h)
        ic = find(ck, cs, cbits, h) if use_cpu else -1
        ip = find(pk, ps, pbits, h) if use_pending else -1
        left = False
        for w in range(nw):
            g = gm[ig, w] if ig >= 0 else zero
            c = cm[ic, w] if ic >= 0 else zero
            p = pm[ip, w] if ip >= 0 else zero
            nr = alive_r[w] & (g | c)
            if nr != alive_r[w]:
                _leave(out_res, w, alive_r[w] ^ nr, i)
                alive_r[w] = nr
            hostonly = nr & c & ~g
            if hostonly:
                b = 0
                while hostonly:
                    if hostonly & np.uint64(1):
                        out_host[w * 64 + b] += 1
                    hostonly >>= np.uint64(1)
                    b += 1
            nb = alive_b[w] & (g | c | p)
            if nb != alive_b[w]:
                _leave(out_both, w, alive_b[w] ^ nb, i)
                alive_b[w] = nb
            if nb:
                left = True
        if not left:
            return
    for w in range(nw):
        _leave(out_res, w, alive_r[w], n)
        _leave(out_both, w, alive_b[w], n)
