"""Placement of new blocks in free space: best-fit over contiguous runs, or first-free.

Best fit (TinyServe): for a request that needs ``n`` blocks and whose last block is ``last``:

1. Extend in place: if the run starting at ``last + 1`` is free, take from it first.
2. Otherwise choose among the ``CANDIDATES`` smallest runs that fit ``want`` blocks
   (``want`` = n, or the request's expected final size when the caller gives one, so decode
   can later extend in place) the run of least cost

       cost(b) = w1·f1 + w2·f2 + w3·f3

   f1 = Var(free run sizes after b) / r̄²   fragmentation left behind (TinyServe f1)
   f2 = |start(b) − (last + 1)| / num_blocks
        locality. NOTE: the published f2 = Σ 1/d² RAISES the cost near the sequence's other
        blocks; for paged KV, contiguity is the goal, so we use the distance itself (nearer is
        cheaper). Documented inversion of the sign.
   f3 = |len(run) − want| / want          size mismatch (TinyServe f3), the best-fit term

   The ``want`` blocks are placed flush with the END of the chosen run (the first ``n`` of
   them now, the rest left free as growth room), so the run's head stays free for the
   sequence that ends just before it.

   Dropped terms, and why: f4 (temporal access of the taken blocks) is zero by construction,
   since only FREE blocks are placement candidates; recently used blocks that still hold KV
   are cached blocks, protected by the eviction policy, which carries the same
   recency/frequency term. The gradient penalty λ·‖g(b)‖² adds nothing with three closed-form
   terms evaluated over a handful of candidates, so it is left out.
3. Scattered fallback: when no run fits, take whole runs largest first (fewest pieces).

First free: the lowest-numbered free blocks, ignoring contiguity (the comparison baseline).
"""

from __future__ import annotations

from kvmanager.free_runs import FreeRuns

CANDIDATES = 4
W_FRAG, W_LOCALITY, W_MISMATCH = 1.0, 0.5, 1.0


def _frag_after(runs: FreeRuns, run_len: int, take: int) -> float:
    """f1: variance of run sizes after taking ``take`` blocks of a run of ``run_len``, / r̄²."""
    lengths = runs.run_lengths()
    lengths.remove(run_len)
    if run_len > take:
        lengths.append(run_len - take)
    if len(lengths) < 2:
        return 0.0
    mean = sum(lengths) / len(lengths)
    var = sum((x - mean) ** 2 for x in lengths) / len(lengths)
    return var / (mean * mean)


def placement_cost(runs: FreeRuns, start: int, run_len: int, want: int, last: int | None) -> float:
    """TinyServe allocation cost of taking ``want`` blocks at the low end of run ``start``."""
    take = min(want, run_len)
    f1 = _frag_after(runs, run_len, take) if len(runs) <= 64 else 0.0
    f2 = 0.0 if last is None else abs(start - (last + 1)) / runs.num_blocks
    f3 = abs(run_len - want) / want
    return W_FRAG * f1 + W_LOCALITY * f2 + W_MISMATCH * f3


def best_fit(runs: FreeRuns, n: int, last: int | None, want: int | None = None) -> list[int]:
    """Take ``n`` free blocks (caller guarantees ``runs.num_free >= n``); returns block ids in
    the order they extend the sequence."""
    out: list[int] = []
    if n == 0:
        return out
    if last is not None and runs.run_at(last + 1):
        out += runs.take(last + 1, min(n, runs.run_at(last + 1)))
        n -= len(out)
        last = out[-1]
    if n == 0:
        return out
    want = max(n, want or n)
    cands = runs.fitting(want, CANDIDATES) or runs.fitting(n, CANDIDATES)
    if cands:
        # NOTE: shortcut where the cost cannot disagree: one candidate, or an exact fit when
        # f1 is off (> 64 runs) and f2 is 0 (no previous block): cost = f3, 0 only there.
        if len(cands) == 1 or (cands[0][0] == want and last is None and len(runs) > 64):
            length, start = cands[0]
        else:
            # NOTE: f1 needs all run sizes (O(#runs)); beyond 64 runs the cheap terms decide.
            length, start = min(
                cands, key=lambda c: (placement_cost(runs, c[1], c[0], want, last), c[1])
            )
        # NOTE: place the request's expected extent flush with the run's END: its growth room
        # is bounded by a used block, and the run's head stays free for whatever sequence ends
        # just before the run (so it too can keep extending in place).
        offset = length - want if length >= want else 0
        return out + runs.take_at(start, offset, n)
    while n > 0:  # scattered fallback: largest runs first
        length, start = next(runs.largest_runs())
        got = runs.take(start, min(n, length))
        out += got
        n -= len(got)
    return out


def first_free(runs: FreeRuns, n: int) -> list[int]:
    """Take the ``n`` lowest-numbered free blocks."""
    out: list[int] = []
    while n > 0:
        start, length = next(runs.lowest_runs())
        got = runs.take(start, min(n, length))
        out += got
        n -= len(got)
    return out


class BlockAllocator:
    """Hands out empty blocks: free runs plus per-request growth reservations.

    A reservation is the empty run right after a request's newest block, set aside (out of
    ``runs``) when best fit places an extent sized for the request's expected length. The
    request's next blocks come from it, so decode stays contiguous even while other requests
    are admitted. Reservations are soft: they count as available capacity, and when free runs
    run short the largest reservations of other requests are cut from their tails first
    (before any cached block is evicted; speculative room is worth less than a prefix hit).
    """

    def __init__(self, runs: FreeRuns, mode: str) -> None:
        self.runs = runs
        self.mode = mode
        self.reserved: dict[str, tuple[int, int]] = {}  # request_id -> (start, length)
        self.num_reserved = 0

    @property
    def num_empty(self) -> int:
        return self.runs.num_free + self.num_reserved

    def allocate(self, request_id: str, n: int, last: int | None, want: int | None) -> list[int]:
        """Take ``n`` empty blocks for ``request_id`` (caller guarantees ``num_empty >= n``)."""
        out: list[int] = []
        if n == 0:
            return out
        start, length = self.reserved.pop(request_id, (0, 0))
        self.num_reserved -= length
        if length:
            k = min(n, length)
            out = list(range(start, start + k))
            if k < length:
                self._reserve(request_id, start + k, length - k)
            n -= k
            last = out[-1]
            want = None if want is None else want - k
        if n == 0:
            return out
        while self.runs.num_free < n:
            # NOTE: cut the largest reservation from its TAIL: its owner needs the head next,
            # and most requests stop before their max_tokens anyway.
            victim = max(self.reserved, key=lambda r: self.reserved[r][1])
            v_start, v_len = self.reserved.pop(victim)
            cut = min(v_len, n - self.runs.num_free)
            self.num_reserved -= v_len
            if cut < v_len:
                self._reserve(victim, v_start, v_len - cut)
            self.runs.put_range(v_start + v_len - cut, cut)
        if self.mode == "first_free":
            return out + first_free(self.runs, n)
        got = best_fit(self.runs, n, last, want)
        room = self.runs.run_at(got[-1] + 1)
        if want is not None and want > n and room:
            self._reserve(request_id, got[-1] + 1, min(room, want - n))
            self.runs.take(got[-1] + 1, min(room, want - n))
        return out + got

    def release(self, request_id: str) -> None:
        """Return a request's reservation (if any) to the free runs."""
        start, length = self.reserved.pop(request_id, (0, 0))
        self.num_reserved -= length
        if length:
            self.runs.put_range(start, length)

    def release_all(self) -> None:
        for request_id in list(self.reserved):
            self.release(request_id)

    def reserve(self, request_id: str, start: int, length: int) -> None:
        """Set aside [start, start + length), already taken out of ``runs``, as the growth
        room of ``request_id`` (compaction hands rooms back this way)."""
        assert request_id not in self.reserved, f"{request_id!r} already holds a reservation"
        self._reserve(request_id, start, length)

    def _reserve(self, request_id: str, start: int, length: int) -> None:
        self.reserved[request_id] = (start, length)
        self.num_reserved += length
