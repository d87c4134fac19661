"""Global KV block index: which replica (slot) holds which block hash.

Layout (R replicas, each owning a small-int ``slot``; bit ``slot`` of a mask = that replica):

    _any     : block_hash -> mask of slots holding it on any tier    (matching reads this)
    _gpu/_cpu: per slot, set of block hashes on the device / host tier (resync, leave, stats)
    _cpu_mask: block_hash -> mask of slots holding it on the host tier (only if a host tier)
    _pending : block_hash -> mask of slots with a speculative insert  (TTL, see mark_pending)

NOTE: one dict lookup and one AND per prompt block gives every replica's longest prefix at
once, O(prompt blocks + matched replicas) instead of O(R x blocks). Python ints are
arbitrary-width bitsets, so R is unbounded.

Contract: not thread-safe (the core serialises calls). Hash values are 64-bit external hashes.
Pending marks are dropped lazily: a Select drains at most a few expired marks and the service
sweeps the rest every TTL/2, so under a backlog a mark may outlive its TTL by up to ~TTL/2.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvmanager.events import MEDIUM_CPU


def mask_to_bool(mask: int, num_slots: int) -> npt.NDArray[np.bool_]:
    """Bitmask -> bool array of length ``num_slots`` (bit i -> element i)."""
    raw = np.frombuffer(mask.to_bytes((num_slots + 7) // 8, "little"), np.uint8)
    return np.unpackbits(raw, bitorder="little")[:num_slots].astype(np.bool_)


@dataclass(slots=True)
class PrefixMatch:
    """Longest exact prefix per slot as segments ``(slots_mask, num_blocks)``: every slot in a
    segment's mask matched exactly that many leading blocks (slots in no segment matched 0).
    ``pending`` segments count the prefix covered by resident OR pending blocks; ``host`` maps
    slot -> matched blocks held on the host tier only."""

    resident_segments: list[tuple[int, int]]
    pending_segments: list[tuple[int, int]]
    host: dict[int, int]

    @property
    def resident(self) -> dict[int, int]:
        return _as_dict(self.resident_segments)

    @property
    def pending(self) -> dict[int, int]:
        """slot -> blocks matched beyond the resident prefix thanks to pending inserts."""
        res = self.resident
        both = _as_dict(self.pending_segments)
        return {s: n - res.get(s, 0) for s, n in both.items() if n > res.get(s, 0)}

    def arrays(
        self, num_slots: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(resident, pending beyond resident, host) block counts indexed by slot."""
        resident = _segments_to_array(self.resident_segments, num_slots)
        pending = np.zeros(num_slots, np.int64)
        if self.pending_segments:
            pending = np.maximum(_segments_to_array(self.pending_segments, num_slots) - resident, 0)
        host = np.zeros(num_slots, np.int64)
        for s, n in self.host.items():
            host[s] = n
        return resident, pending, host


def _as_dict(segments: list[tuple[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for mask, n in segments:
        while mask:
            low = mask & -mask
            out[low.bit_length() - 1] = n
            mask ^= low
    return out


def _segments_to_array(segments: list[tuple[int, int]], num_slots: int) -> npt.NDArray[np.int64]:
    out = np.zeros(num_slots, np.int64)
    for mask, n in segments:
        out[mask_to_bool(mask, num_slots)] = n
    return out


def _walk(
    get: Callable[[int, int], int], block_hashes: Sequence[int], slots_mask: int
) -> list[tuple[int, int]]:
    """Segments (mask of slots that matched exactly n leading blocks, n), n > 0 only.
    NOTE: one dict lookup + one AND per block; the walk stops when no slot is left."""
    segments: list[tuple[int, int]] = []
    alive = slots_mask
    for i, h in enumerate(block_hashes):
        nxt = alive & get(h, 0)
        if nxt != alive:
            if i:
                segments.append((alive ^ nxt, i))
            alive = nxt
            if not alive:
                return segments
    if block_hashes and alive:
        segments.append((alive, len(block_hashes)))
    return segments


def _walk2(
    get: Callable[[int, int], int],
    pget: Callable[[int, int], int],
    block_hashes: Sequence[int],
    slots_mask: int,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Both walks in one pass: resident-only segments and resident-or-pending segments."""
    res: list[tuple[int, int]] = []
    both: list[tuple[int, int]] = []
    alive_r = alive_b = slots_mask
    for i, h in enumerate(block_hashes):
        m = get(h, 0)
        nxt_r = alive_r & m
        nxt_b = alive_b & (m | pget(h, 0))
        if nxt_r != alive_r:
            if i:
                res.append((alive_r ^ nxt_r, i))
            alive_r = nxt_r
        if nxt_b != alive_b:
            if i:
                both.append((alive_b ^ nxt_b, i))
            alive_b = nxt_b
            if not alive_b:  # NOTE: alive_r is a subset of alive_b
                return res, both
    n = len(block_hashes)
    if n and alive_r:
        res.append((alive_r, n))
    if n and alive_b:
        both.append((alive_b, n))
    return res, both


class KVIndex:
    """Resident and pending block hashes of every replica slot."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._any: dict[int, int] = {}
        self._cpu_mask: dict[int, int] = {}
        self._gpu: dict[int, set[int]] = {}
        self._cpu: dict[int, set[int]] = {}
        self._pending: dict[int, int] = {}
        self._pending_deadline: dict[int, dict[int, float]] = {}
        self._pending_queue: deque[tuple[float, int, tuple[int, ...]]] = deque()

    # ------------------------------------------------------------------ membership
    def add_slot(self, slot: int) -> None:
        """Start tracking an (empty) slot; idempotent."""
        self._gpu.setdefault(slot, set())
        self._cpu.setdefault(slot, set())
        self._pending_deadline.setdefault(slot, {})

    def remove_slot(self, slot: int) -> None:
        """Forget every resident and pending hash of ``slot``; the slot number may be reused."""
        self.clear(slot)
        bit = 1 << slot
        for h in self._pending_deadline.pop(slot, {}):
            self._clear_bit(self._pending, h, bit)
        self._gpu.pop(slot, None)
        self._cpu.pop(slot, None)

    def num_resident(self, slot: int) -> int:
        return len(self._gpu.get(slot, ())) + len(self._cpu.get(slot, ()))

    def num_pending(self, slot: int) -> int:
        return len(self._pending_deadline.get(slot, ()))

    @property
    def num_unique_blocks(self) -> int:
        return len(self._any)

    # ------------------------------------------------------------------ mutation
    def store(self, slot: int, block_hashes: Iterable[int], medium: str | None = None) -> int:
        """Mark hashes resident on ``slot`` (host tier when ``medium == "CPU"``). Returns the
        number of hashes applied."""
        bit = 1 << slot
        hashes = block_hashes if isinstance(block_hashes, list) else list(block_hashes)
        host = medium == MEDIUM_CPU
        (self._cpu[slot] if host else self._gpu[slot]).update(hashes)
        any_, get = self._any, self._any.get
        for h in hashes:
            any_[h] = get(h, 0) | bit
        if host:
            cpu_mask, cget = self._cpu_mask, self._cpu_mask.get
            for h in hashes:
                cpu_mask[h] = cget(h, 0) | bit
        return len(hashes)

    def remove(self, slot: int, block_hashes: Iterable[int], medium: str | None = None) -> int:
        """Drop hashes from one tier of ``slot``; unknown hashes are ignored. Returns the count
        of hashes named."""
        bit = 1 << slot
        host = medium == MEDIUM_CPU
        tier, other = (
            (self._cpu[slot], self._gpu[slot]) if host else (self._gpu[slot], self._cpu[slot])
        )
        n = 0
        for h in block_hashes:
            n += 1
            if h not in tier:
                continue
            tier.discard(h)
            if host:
                self._clear_bit(self._cpu_mask, h, bit)
            if h not in other:
                self._clear_bit(self._any, h, bit)
        return n

    def clear(self, slot: int) -> None:
        """AllBlocksCleared: drop every resident hash of ``slot`` (pending inserts stay)."""
        bit = 1 << slot
        gpu, cpu = self._gpu.get(slot, set()), self._cpu.get(slot, set())
        for h in gpu | cpu:
            self._clear_bit(self._any, h, bit)
        for h in cpu:
            self._clear_bit(self._cpu_mask, h, bit)
        gpu.clear()
        cpu.clear()

    def replace(self, slot: int, gpu_hashes: Iterable[int], cpu_hashes: Iterable[int] = ()) -> None:
        """Full resync: the resident set of ``slot`` becomes exactly the given hashes."""
        self.clear(slot)
        self.store(slot, gpu_hashes)
        self.store(slot, cpu_hashes, MEDIUM_CPU)

    def mark_pending(self, slot: int, block_hashes: Sequence[int], ttl_s: float) -> None:
        """Speculative insert: treat ``block_hashes`` as held by ``slot`` for ``ttl_s`` seconds
        (so siblings of a burst follow the first request before its KV events arrive)."""
        if not block_hashes or ttl_s <= 0:
            return
        deadline = self._clock() + ttl_s
        bit = 1 << slot
        hashes = tuple(block_hashes)
        self._pending_deadline[slot].update(dict.fromkeys(hashes, deadline))
        pending, get = self._pending, self._pending.get
        for h in hashes:
            pending[h] = get(h, 0) | bit
        self._pending_queue.append((deadline, slot, hashes))

    def expire_pending(self, max_marks: int | None = None) -> int:
        """Drop pending inserts whose TTL passed; returns how many (slot, hash) pairs expired.
        ``max_marks`` bounds the work (in mark_pending calls) so a Select never pays for a
        long backlog; the service's background loop calls it unbounded."""
        now = self._clock()
        queue = self._pending_queue
        n = 0
        budget = len(queue) if max_marks is None else max_marks
        while budget > 0 and queue and queue[0][0] <= now:
            budget -= 1
            _, slot, hashes = queue.popleft()
            per_slot = self._pending_deadline.get(slot)
            if per_slot is None:
                continue
            keep = ~(1 << slot)
            pending, get = self._pending, self._pending.get
            for h in hashes:
                # NOTE: a later mark_pending of the same hash pushed its deadline; keep that one.
                deadline = per_slot.get(h)
                if deadline is not None and deadline <= now:
                    del per_slot[h]
                    m = get(h, 0) & keep
                    if m:
                        pending[h] = m
                    else:
                        del pending[h]
                    n += 1
        return n

    # ------------------------------------------------------------------ query
    def match(self, block_hashes: Sequence[int], slots_mask: int) -> PrefixMatch:
        """Longest exact prefix of ``block_hashes`` on every slot in ``slots_mask``; a pending
        insert whose deadline has passed does not count, expired or not."""
        pending: list[tuple[int, int]] = []
        if self._pending:
            resident, pending = _walk2(self._any.get, self._live_pending, block_hashes,
                                       slots_mask)  # fmt: skip
        else:
            resident = _walk(self._any.get, block_hashes, slots_mask)
        host: dict[int, int] = {}
        if self._cpu_mask and resident:
            host = self._count_host_only(block_hashes, _as_dict(resident))
        return PrefixMatch(resident, pending, host)

    def _live_pending(self, h: int, default: int = 0) -> int:
        """The slots pending on ``h`` whose deadline is still ahead."""
        now, live, rest, slot = self._clock(), 0, self._pending.get(h, 0), 0
        while rest:
            if rest & 1 and self._pending_deadline.get(slot, {}).get(h, math.inf) > now:
                live |= 1 << slot
            rest >>= 1
            slot += 1
        return live or default

    def _count_host_only(
        self, block_hashes: Sequence[int], resident: dict[int, int]
    ) -> dict[int, int]:
        host: dict[int, int] = {}
        for slot, n in resident.items():
            gpu = self._gpu[slot]
            k = sum(1 for h in block_hashes[:n] if h not in gpu)
            if k:
                host[slot] = k
        return host

    def holds(self, slot: int, block_hash: int) -> bool:
        return bool(self._any.get(block_hash, 0) >> slot & 1)

    @staticmethod
    def _clear_bit(masks: dict[int, int], h: int, bit: int) -> None:
        m = masks.get(h, 0) & ~bit
        if m:
            masks[h] = m
        else:
            masks.pop(h, None)
