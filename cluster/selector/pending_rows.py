"""Compiled mark / unmark of the pending table: the speculative inserts' (block_hash, slot)
marks held in ``HolderTable`` rows (16 B: a key and up to three slot ids inline, an overflow
mask row for a block pending on 4+ slots; ``holder_kernels`` draws the row).

These are ``holder_kernels.set_slot`` / ``clear_slot_of`` as the Select's route and expiry call
them from compiled code: no pool growth (the caller reserved it: ``HolderTable.reserve`` with
``overflow``) and a prefetch of each hash's probe run (``touch_run``), not its home row alone.

NOTE: why holder rows: a pending mark is nearly always one slot, and the mask rows held it in
a key plus W mask words, 40 B at 256 slots (W = 4), so a mark's insert, probe and backward
shift touched ~2.5x the cache lines these rows do (four to a line).
Every function is pure over its array arguments (mutating only the ones it documents).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster.selector import holder_kernels as hk
from cluster.selector.index_kernels import _home, _jit

# NOTE: rows past the home row that ``touch_run`` loads: with 16-byte rows, the home row and
# the 3rd row after it cover a probe run of 4 rows (two cache lines at most), which a mark's
# probe and a delete's backward shift at the pending table's load rarely pass. (The mask
# rows' prefetch of their run, 2 rows of 40 B ahead, took the expiry's clears 15 -> 12 us a
# Select at 256 x 100k against the home row alone.)
RUN_AHEAD = 3


@_jit
def touch_run(tab: Any, bits: int, hashes: Any, sink: Any) -> None:
    """Load the home row of every hash and the row ``RUN_AHEAD`` after it (a prefetch, see
    ``index_kernels.touch``); ``sink[0]`` gets a meaningless value."""
    acc = np.uint64(0)
    m = np.int64((1 << bits) - 1)
    for j in range(hashes.shape[0]):
        i = _home(hashes[j], bits)
        acc ^= tab[i, 0] ^ tab[(i + RUN_AHEAD) & m, 1]
    sink[0] ^= acc


@_jit
def mark(
    tab: Any, bits: int, over: Any, ostate: Any, hashes: Any, slot: int, sink: Any
) -> tuple[int, int]:
    """Add ``slot`` to the pending row of every hash (inserting new keys). Returns (marks
    added, rows created). The caller must have reserved room for ``len(hashes)`` new keys
    and free overflow rows (``reserve``): a pool that runs out is a broken reservation."""
    touch_run(tab, bits, hashes, sink)
    added, created, nxt = hk.add_all(tab, bits, over, ostate, hashes, slot, 0)
    assert nxt == hashes.shape[0], "pending overflow pool not reserved"
    return added, created


@_jit
def unmark(
    tab: Any, bits: int, over: Any, ostate: Any, hashes: Any, slot: int, sink: Any
) -> tuple[int, int]:
    """Remove ``slot`` from the pending row of every hash (unknown hashes ignored); rows left
    with no slot are deleted (backward shift). Returns (marks removed, rows deleted)."""
    touch_run(tab, bits, hashes, sink)
    return hk.drop_all(tab, bits, over, ostate, hashes, slot)
