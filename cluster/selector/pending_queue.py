"""PendingQueue: the speculative inserts (pending marks) in deadline order, as rings that one
compiled call drains.

Layout (both rings power-of-two sized; head and tail are ever-growing counters, an entry's
position is its counter modulo the ring's size):

    dl     : float64[mcap]    deadline of mark i (one mark = one ``mark_pending`` call)
    meta   : int64[mcap, 3]   its slot, the counter of its first hash, its number of hashes
    ring   : uint64[hcap]     every mark's hashes, back to back
    state  : int64[4]         marks head, marks tail, hashes head, hashes tail

NOTE: this replaces a deque of (deadline, slot, array) drained by a Python loop that made two
compiled calls per mark (~15 us of a Select at 256 replicas in steady state: one mark in, one
out); here a Select's bounded expiry is one compiled call. Deadlines are pushed in
non-decreasing order (one TTL, a monotonic clock), so the head is always the next due.
Contract: not thread-safe (the core serialises calls); arrays are replaced on growth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.selector import pending_deadlines as pd
from cluster.selector import pending_rows
from cluster.selector.generation import bump
from cluster.selector.holder_table import HolderTable
from cluster.selector.index_kernels import SINK, _jit, zeros

U64 = npt.NDArray[np.uint64]


@_jit
def _push(dl: Any, meta: Any, ring: Any, state: Any, deadline: float, slot: int,
          hashes: Any) -> None:  # fmt: skip
    mm, hm = dl.shape[0] - 1, ring.shape[0] - 1
    i = state[1] & mm
    n = hashes.shape[0]
    dl[i], meta[i, 0], meta[i, 1], meta[i, 2] = deadline, slot, state[3], n
    for j in range(n):
        ring[(state[3] + j) & hm] = hashes[j]
    state[1] += 1
    state[3] += n


@_jit
def expire(
    dl: Any, meta: Any, ring: Any, state: Any, now: float, max_marks: int,
    d_keys: Any, d_slots: Any, d_dl: Any, d_bits: int, ptab: Any, pover: Any, postate: Any,
    pbits: int, num_pending: Any, sink: Any,
) -> tuple[int, int]:  # fmt: skip
    """Drain the marks due by ``now`` (at most ``max_marks`` of them; < 0: all): each
    (hash, slot) pair whose deadline is still due leaves the deadline table and the pending
    rows (``ptab`` / ``pover`` / ``postate``, ``pending_rows``), and ``num_pending[slot]``
    drops. A pair whose deadline a later mark pushed stays. Returns (pairs expired, pending
    rows deleted)."""
    mm, hm = dl.shape[0] - 1, ring.shape[0] - 1
    pairs = rows = 0
    budget = max_marks
    while budget != 0 and state[0] < state[1]:
        i = state[0] & mm
        if dl[i] > now:
            break
        slot, start, n = meta[i, 0], meta[i, 1], meta[i, 2]
        hashes = np.empty(n, np.uint64)
        for j in range(n):
            hashes[j] = ring[(start + j) & hm]
        # NOTE: _expire writes the expired hashes over the front of its input (safe: it
        # writes position e only after reading positions >= e)
        e = pd._expire(d_keys, d_slots, d_dl, d_bits, hashes, slot, now, hashes, sink)
        if e:
            _, deleted = pending_rows.unmark(ptab, pbits, pover, postate, hashes[:e], slot, sink)
            rows += deleted
            num_pending[slot] -= e
            pairs += e
        state[0] += 1
        state[2] = start + n
        budget -= 1
    return pairs, rows


class PendingQueue:
    """Pending marks in deadline order; see the module docstring."""

    def __init__(self, num_marks: int = 1024, num_hashes: int = 1 << 16) -> None:
        self.dl = zeros(_pow2(num_marks), np.float64)
        self.meta = zeros((_pow2(num_marks), 3), np.int64)
        self.ring = zeros(_pow2(num_hashes), np.uint64)
        self.state = np.zeros(4, np.int64)
        bump()

    def __len__(self) -> int:
        """Marks not yet drained."""
        return int(self.state[1] - self.state[0])

    def reserve(self, num_hashes: int, num_marks: int = 1) -> None:
        """Make room for ``num_marks`` more marks of ``num_hashes`` hashes in all (grows by
        copying, rarely; never shrinks).
        NOTE: a ring sized for the marks it holds now and not its own size shrank the marks
        ring to 2 entries at start-up (``reserve_pending`` reserves hashes, not marks), so the
        first ~1,000 Selects paid ten doublings of 50-600 us each."""
        mh, mt, hh, ht = self.state.tolist()
        if mt - mh + num_marks <= len(self.dl) and ht - hh + num_hashes <= len(self.ring):
            return
        live_m = np.arange(mh, mt) & (len(self.dl) - 1)
        live_h = np.arange(hh, ht) & (len(self.ring) - 1)
        dl = zeros(max(_pow2(2 * (mt - mh + num_marks)), len(self.dl)), np.float64)
        meta = zeros((len(dl), 3), np.int64)
        ring = zeros(max(_pow2(2 * (ht - hh + num_hashes)), len(self.ring)), np.uint64)
        dl[: mt - mh] = self.dl[live_m]
        meta[: mt - mh] = self.meta[live_m]
        meta[: mt - mh, 1] -= hh
        ring[: ht - hh] = self.ring[live_h]
        self.dl, self.meta, self.ring = dl, meta, ring
        bump()
        self.state[:] = (0, mt - mh, 0, ht - hh)

    def push(self, deadline: float, slot: int, hashes: U64) -> None:
        """Append a mark (its deadline no earlier than the last one's)."""
        self.reserve(len(hashes))
        _push(self.dl, self.meta, self.ring, self.state, deadline, slot, hashes)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels once per process; idempotent."""
    q = PendingQueue(num_marks=2, num_hashes=4)
    h = np.arange(1, 4, dtype=np.uint64)
    d = pd.PendingDeadlines(bits=3)
    t = HolderTable(bits=3)
    d.set(h, 0, 1.0)
    t.reserve_overflow(len(h))
    pending_rows.mark(t.tab, t.bits, t.over, t.ostate, h, 0, SINK)
    for _ in range(3):
        q.push(1.0, 0, h)  # NOTE: the third push grows both rings
    expire(q.dl, q.meta, q.ring, q.state, 2.0, -1, d.keys, d.slots, d.dl, d.bits, t.tab, t.over,
           t.ostate, t.bits, np.ones(1, np.int64) * 3, SINK)  # fmt: skip
