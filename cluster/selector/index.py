"""Global KV block index: which replica (slot) holds which block hash.

Layout (R replicas, each owning a small-int ``slot``; bit ``slot`` of a mask = that replica):

    _gpu     : HolderTable  block_hash -> slots holding it on the device tier (dense, big)
    _cpu     : HolderTable  block_hash -> slots holding it on the host tier   (usually empty)
    _pending : HolderTable  block_hash -> slots with a speculative insert     (TTL, mark_pending)
    _deadlines: PendingDeadlines  (block_hash, slot) -> deadline of its pending mark
    _queue   : PendingQueue  the marks in deadline order (what expiry drains)

NOTE: all three keep 16-byte rows (a key and up to three slot ids inline, a mask in an
overflow pool for blocks held or pending on more: ``holder_table``; the pending marks' compiled
mark / unmark are ``pending_rows``). One compiled pass over the prompt's hashes
(``walk_kernel.walk``) ANDs the masks block by block and gives every candidate's longest
prefix at once: O(prompt blocks x mask words), stopping at the first block no candidate holds.
Equivalence with the previous dict-of-ints index is tested by hypothesis
(tests/cluster/test_selector_index.py, test_selector_holder_table.py: many holders a block).

Contract: not thread-safe (the core serialises calls). Hash values are 64-bit external hashes
(Python ints in [-2^63, 2^64); a negative value and its 64-bit two's complement name the
same block). Pending marks are dropped lazily: a Select drains at
most a few expired marks and the service sweeps the rest every TTL/2, so under a backlog a mark
may outlive its TTL by up to ~TTL/2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cluster.selector import holder_table, pending_deadlines, pending_queue, walk_kernel
from cluster.selector import index_kernels as k
from cluster.selector.generation import bump
from cluster.selector.holder_table import HolderTable
from cluster.selector.pending_deadlines import PendingDeadlines
from cluster.selector.pending_queue import PendingQueue
from kvmanager.events import MEDIUM_CPU

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
PENDING_MAX_LOAD = 0.5


def as_hash_array(block_hashes: Iterable[int]) -> U64:
    """Block hashes as uint64 (negative int64 values wrap to their two's complement)."""
    if isinstance(block_hashes, np.ndarray):
        if block_hashes.dtype == np.uint64:
            return block_hashes
        return block_hashes.astype(np.int64, copy=False).view(np.uint64)
    seq = block_hashes if isinstance(block_hashes, list | tuple) else list(block_hashes)
    try:
        return np.asarray(seq, np.int64).view(np.uint64)
    except OverflowError:
        return np.asarray([h - (1 << 64) if h >= 1 << 63 else h for h in seq], np.int64).view(
            np.uint64
        )


@dataclass(slots=True)
class PrefixMatch:
    """Longest exact prefix per slot, as arrays indexed by slot (length >= every queried
    slot + 1): ``resident_blocks`` leading blocks held on any tier, ``both_blocks`` leading
    blocks held or pending, ``host_blocks`` blocks of the resident prefix on the host tier
    only."""

    resident_blocks: I64
    both_blocks: I64
    host_blocks: I64

    @property
    def resident(self) -> dict[int, int]:
        """slot -> matched resident blocks (slots with 0 omitted)."""
        return _nonzero(self.resident_blocks)

    @property
    def pending(self) -> dict[int, int]:
        """slot -> blocks matched beyond the resident prefix thanks to pending inserts."""
        return _nonzero(self.both_blocks - self.resident_blocks)

    @property
    def host(self) -> dict[int, int]:
        return _nonzero(self.host_blocks)

    def lengths(self) -> set[int]:
        """The distinct non-zero resident prefix lengths."""
        r = self.resident_blocks
        return set(r[r > 0].tolist())

    def arrays(self, num_slots: int) -> tuple[I64, I64, I64]:
        """(resident, pending beyond resident, host) block counts indexed by slot."""
        s = slice(0, num_slots)
        res = self.resident_blocks[s]
        return res, self.both_blocks[s] - res, self.host_blocks[s]


def _nonzero(a: I64) -> dict[int, int]:
    idx = np.flatnonzero(a)
    return dict(zip(idx.tolist(), a[idx].tolist(), strict=True))


class KVIndex:
    """Resident and pending block hashes of every replica slot."""

    def __init__(self, clock: Callable[[], float]) -> None:
        holder_table.warm_up()
        walk_kernel.warm_up()
        pending_deadlines.warm_up()
        pending_queue.warm_up()
        self._clock = clock
        self._gpu = HolderTable(bits=16)
        self._cpu = HolderTable()
        # NOTE: at most half full (the resident tiers: 4/5): the pending rows churn (a Select
        # inserts ~64 marks and deletes as many, each probing to the end of its run); at 320k
        # marks 0.61 full became 0.31 (8 -> 16 MiB, the mask rows took 20), the route's p50
        # ~34 -> ~30 us hot (benchmarks/README.md, "Fourteenth pass")
        self._pending = HolderTable(max_load=PENDING_MAX_LOAD)
        self._num_gpu = np.zeros(64, np.int64)
        self._num_cpu = np.zeros(64, np.int64)
        self._num_pending = np.zeros(64, np.int64)
        bump()
        self._deadlines = PendingDeadlines()
        self._queue = PendingQueue()

    @property
    def num_words(self) -> int:
        return self._gpu.num_words

    def nbytes(self) -> int:
        """Bytes held by the index's arrays (not counting the pending deadline dicts)."""
        return self._gpu.nbytes() + self._cpu.nbytes() + self._pending.nbytes()

    # ------------------------------------------------------------------ membership
    def add_slot(self, slot: int) -> None:
        """Start tracking an (empty) slot; idempotent."""
        words = slot // 64 + 1
        if words > self.num_words:
            self._gpu.widen(words)
            self._cpu.widen(words)
            self._pending.widen(words)
        if slot >= len(self._num_gpu):
            grow = max(2 * len(self._num_gpu), slot + 1) - len(self._num_gpu)
            self._num_gpu = np.concatenate([self._num_gpu, np.zeros(grow, np.int64)])
            self._num_cpu = np.concatenate([self._num_cpu, np.zeros(grow, np.int64)])
            self._num_pending = np.concatenate([self._num_pending, np.zeros(grow, np.int64)])
            bump()

    def remove_slot(self, slot: int) -> None:
        """Forget every resident and pending hash of ``slot``; the slot number may be reused."""
        self.clear(slot)
        if slot < len(self._num_pending) and self._num_pending[slot]:
            self._pending.clear_slot_of(self._deadlines.drop_slot(slot), slot)
            self._num_pending[slot] = 0

    def num_resident(self, slot: int) -> int:
        if slot >= len(self._num_gpu):
            return 0
        return int(self._num_gpu[slot] + self._num_cpu[slot])

    def num_pending(self, slot: int) -> int:
        return int(self._num_pending[slot]) if slot < len(self._num_pending) else 0

    @property
    def num_unique_blocks(self) -> int:
        """Distinct hashes held by any slot on any tier."""
        if not len(self._cpu):
            return len(self._gpu)
        return len(self._gpu) + self._cpu.keys_missing_from(self._gpu)

    # ------------------------------------------------------------------ mutation
    def store(self, slot: int, block_hashes: Iterable[int], medium: str | None = None) -> int:
        """Mark hashes resident on ``slot`` (host tier when ``medium == "CPU"``). Returns the
        number of hashes applied."""
        hashes = as_hash_array(block_hashes)
        if medium == MEDIUM_CPU:
            self._num_cpu[slot] += self._cpu.set_slot(hashes, slot)
        else:
            self._num_gpu[slot] += self._gpu.set_slot(hashes, slot)
        return len(hashes)

    def remove(self, slot: int, block_hashes: Iterable[int], medium: str | None = None) -> int:
        """Drop hashes from one tier of ``slot``; unknown hashes are ignored. Returns the count
        of hashes named."""
        hashes = as_hash_array(block_hashes)
        if medium == MEDIUM_CPU:
            if len(self._cpu):
                self._num_cpu[slot] -= self._cpu.clear_slot_of(hashes, slot)
        else:
            self._num_gpu[slot] -= self._gpu.clear_slot_of(hashes, slot)
        return len(hashes)

    def clear(self, slot: int) -> None:
        """AllBlocksCleared: drop every resident hash of ``slot`` (pending inserts stay)."""
        if slot >= len(self._num_gpu):
            return
        if self._num_gpu[slot]:
            self._gpu.clear_slot(slot)
        if self._num_cpu[slot]:
            self._cpu.clear_slot(slot)
        self._num_gpu[slot] = self._num_cpu[slot] = 0

    def replace(self, slot: int, gpu_hashes: Iterable[int], cpu_hashes: Iterable[int] = ()) -> None:
        """Full resync: the resident set of ``slot`` becomes exactly the given hashes."""
        self.clear(slot)
        self.store(slot, gpu_hashes)
        self.store(slot, cpu_hashes, MEDIUM_CPU)

    def reserve_pending(self, num_marks: int) -> None:
        """Size the pending tables for ``num_marks`` (hash, slot) marks without a doubling."""
        self._pending.reserve(num_marks)
        self._deadlines.reserve(num_marks)
        # NOTE: a Select queues one mark of its uncached blocks; 16 a mark is a short prompt
        self._queue.reserve(num_marks, max(num_marks // 16, 1))

    def reserve_route(self, num_new: int) -> None:
        """Make room for one pending mark of ``num_new`` hashes (a Select's speculative
        insert): the pending rows (each may need an overflow row), deadlines and queue. A
        reservation may replace arrays (``generation.bump``): call it before reading
        ``bound_arrays``."""
        self._pending.reserve(num_new)
        self._pending.reserve_overflow(num_new)
        self._deadlines.reserve(num_new)
        self._queue.reserve(num_new)

    def bound_arrays(self) -> tuple[Any, ...]:
        """The index's part of ``select_kernel.BOUND_ARGS``: the device and host tables (tab,
        over, bits), the pending one (tab, over, ostate, bits), then the deadline table (keys,
        slots, deadlines, bits), the queue (dl, meta, ring, state) and the per-slot pending
        counts, split around the caller's arrays as ``Ranker`` arranges them. Valid while
        ``Generation.value`` stays the same; report what the kernel did with ``routed``."""
        g, c, p, d, q = self._gpu, self._cpu, self._pending, self._deadlines, self._queue
        return (g.tab, g.over, g.bits, c.tab, c.over, c.bits, p.tab, p.over, p.ostate, p.bits,
                d.keys, d.slots, d.dl, d.bits, q.dl, q.meta, q.ring, q.state, self._num_pending)  # fmt: skip

    def tiers_in_use(self) -> tuple[bool, bool]:
        """(host tier non-empty, pending marks non-empty): the walk's ``use_cpu`` and
        ``use_pending``, which change without any array being replaced."""
        return self._cpu.count > 0, self._pending.count > 0

    def routed(self, new_marks: int, new_rows: int, expired_marks: int, expired_rows: int) -> None:
        """Book-keeping of a ``rank_and_route`` call: the (hash, slot) deadlines and pending
        rows it created and those its expiry dropped (the per-slot counts and the queue it
        updated itself)."""
        self._deadlines.count += new_marks - expired_marks
        self._pending.count += new_rows - expired_rows

    def mark_pending(self, slot: int, block_hashes: Sequence[int] | U64, ttl_s: float) -> None:
        """Speculative insert: treat ``block_hashes`` as held by ``slot`` for ``ttl_s`` seconds
        (so siblings of a burst follow the first request before its KV events arrive)."""
        if not len(block_hashes) or ttl_s <= 0:
            return
        deadline = self._clock() + ttl_s
        hashes = as_hash_array(block_hashes)
        self._num_pending[slot] += self._deadlines.set(hashes, slot, deadline)
        self._pending.set_slot(hashes, slot)
        self._queue.push(deadline, slot, hashes)

    def expire_pending(self, max_marks: int | None = None, now: float | None = None) -> int:
        """Drop pending inserts whose TTL passed by ``now`` (default: the clock's); returns
        how many (slot, hash) pairs expired. ``max_marks`` bounds the work (in mark_pending
        calls) so a Select never pays for a long backlog; the service's background loop calls
        it unbounded."""
        now = self._clock() if now is None else now
        q, d, p = self._queue, self._deadlines, self._pending
        if not len(q) or q.dl[q.state[0] & (len(q.dl) - 1)] > now:
            return 0
        # NOTE: a later mark_pending of the same hash pushed its deadline; that one stays.
        pairs, rows = pending_queue.expire(
            q.dl, q.meta, q.ring, q.state, now, -1 if max_marks is None else max_marks,
            d.keys, d.slots, d.dl, d.bits, p.tab, p.over, p.ostate, p.bits, self._num_pending,
            k.SINK,
        )  # fmt: skip
        d.count -= int(pairs)
        p.count -= int(rows)
        return int(pairs)

    # ------------------------------------------------------------------ query
    def slots_mask(self, slots: Iterable[int]) -> npt.NDArray[np.uint64]:
        """The candidate bitmask (uint64 words) of ``slots``."""
        arr = np.fromiter(slots, np.int64) if not isinstance(slots, np.ndarray) else slots
        out: npt.NDArray[np.uint64] = k.mask_from_slots(arr.astype(np.int64), self.num_words)
        return out

    def match(
        self, block_hashes: Sequence[int] | I64 | U64, slots_mask: int | npt.NDArray[np.uint64]
    ) -> PrefixMatch:
        """Longest exact prefix of ``block_hashes`` on every slot in ``slots_mask`` (a Python
        int bitmask, or the words from ``slots_mask()``); a pending mark due by the clock's
        now does not count, expired or not (``walk_kernel.walk``)."""
        cand = self._mask_words(slots_mask)
        size = 64 * self.num_words
        res = np.zeros(size, np.int64)
        both = np.zeros(size, np.int64)
        host = np.zeros(size, np.int64)
        g, c, p, d = self._gpu, self._cpu, self._pending, self._deadlines
        walk_kernel.walk(
            as_hash_array(block_hashes),
            g.tab, g.over, g.bits,
            c.tab, c.over, c.bits, len(c) > 0,
            p.tab, p.over, p.bits, len(p) > 0,
            d.keys, d.slots, d.dl, d.bits, self._clock(),
            cand, res, both, host, k.SINK,
        )  # fmt: skip
        return PrefixMatch(res, both, host)

    def mask_words(self, mask: int) -> npt.NDArray[np.uint64]:
        """The candidate bitmask (a Python int over slots) as the walk's uint64 words."""
        return self._mask_words(mask)

    def _mask_words(self, mask: int | npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        if isinstance(mask, np.ndarray):
            return mask
        nw = self.num_words
        mask &= (1 << (64 * nw)) - 1
        return np.frombuffer(mask.to_bytes(8 * nw, "little"), np.uint64).copy()

    def holds(self, slot: int, block_hash: int) -> bool:
        h = as_hash_array([block_hash])[0]
        return self._gpu.has(h, slot) or (len(self._cpu) > 0 and self._cpu.has(h, slot))
