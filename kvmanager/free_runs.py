"""Free space of the pool as maximal runs of contiguous free block ids.

    block ids:  0 1 2 3 4 5 6 7 8 9
    state:      U U F F F U F F U F      U = in use or cached, F = free
    runs:           [2,5)     [6,8)  [9,10)   (start, length) = (2,3) (6,2) (9,1)

Three views are kept in step so every query is O(log n):
- ``_len_at[start]``  length of the run starting at ``start``
- ``_start_of_end[end]`` start of the run ending (exclusive) at ``end``: merging on free
- ``_by_size``  sorted (length, start): best fit = first entry with length >= n
- ``_by_start`` sorted starts: first-free order, address queries, compaction
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList


class FreeRuns:
    """Set of free block ids stored as maximal runs. Mutators keep runs maximal."""

    def __init__(self, num_blocks: int, all_free: bool = True) -> None:
        self.num_blocks = num_blocks
        self._len_at: dict[int, int] = {}
        self._start_of_end: dict[int, int] = {}
        self._by_size: SortedList = SortedList()
        self._by_start: SortedList = SortedList()
        self.num_free = 0
        if all_free and num_blocks > 0:
            self._add_run(0, num_blocks)

    # -- run bookkeeping ---------------------------------------------------------------------
    def _add_run(self, start: int, length: int) -> None:
        self._len_at[start] = length
        self._start_of_end[start + length] = start
        self._by_size.add((length, start))
        self._by_start.add(start)
        self.num_free += length

    def _remove_run(self, start: int) -> int:
        length = self._len_at.pop(start)
        del self._start_of_end[start + length]
        self._by_size.remove((length, start))
        self._by_start.remove(start)
        self.num_free -= length
        return length

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._len_at)

    def runs(self) -> Iterator[tuple[int, int]]:
        """(start, length) of every run in address order."""
        for start in self._by_start:
            yield start, self._len_at[start]

    def run_lengths(self) -> list[int]:
        return [length for length, _ in self._by_size]

    def largest(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def run_at(self, start: int) -> int:
        """Length of the run starting exactly at ``start`` (0 if none)."""
        return self._len_at.get(start, 0)

    def is_free(self, block_id: int) -> bool:
        i = self._by_start.bisect_right(block_id) - 1
        if i < 0:
            return False
        start: int = self._by_start[i]
        return block_id < start + self._len_at[start]

    def fitting(self, n: int, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` runs with length >= n, smallest first, as (length, start)."""
        # NOTE: irange walks the sorted lists directly; positional islice would rebuild
        # SortedList's index after every mutation (the hot path of allocation).
        return list(itertools.islice(self._by_size.irange(minimum=(n, -1)), limit))

    def largest_runs(self) -> Iterator[tuple[int, int]]:
        """Runs as (length, start), largest first."""
        by_size: Iterable[tuple[int, int]] = reversed(self._by_size)
        yield from by_size

    def lowest_runs(self) -> Iterator[tuple[int, int]]:
        """Runs as (start, length), lowest address first."""
        return self.runs()

    # -- mutation ----------------------------------------------------------------------------
    def take(self, start: int, n: int) -> list[int]:
        """Take ``n`` blocks from the run starting at ``start``, from its low end."""
        length = self._remove_run(start)
        assert n <= length, "take beyond run"
        if n < length:
            self._add_run(start + n, length - n)
        return list(range(start, start + n))

    def take_at(self, start: int, offset: int, n: int) -> list[int]:
        """Take ``n`` blocks beginning ``offset`` blocks into the run starting at ``start``."""
        length = self._remove_run(start)
        assert offset + n <= length, "take beyond run"
        if offset:
            self._add_run(start, offset)
        if offset + n < length:
            self._add_run(start + offset + n, length - offset - n)
        return list(range(start + offset, start + offset + n))

    def take_block(self, block_id: int) -> None:
        """Remove one specific free block (splits its run)."""
        i = self._by_start.bisect_right(block_id) - 1
        start = self._by_start[i]
        length = self._remove_run(start)
        assert block_id < start + length, "block not free"
        if block_id > start:
            self._add_run(start, block_id - start)
        if block_id + 1 < start + length:
            self._add_run(block_id + 1, start + length - block_id - 1)

    def take_range(self, start: int, n: int) -> None:
        """Remove the free range [start, start + n) (it must lie inside one run)."""
        i = self._by_start.bisect_right(start) - 1
        assert i >= 0, "range not free"
        run = self._by_start[i]
        assert start + n <= run + self._len_at[run], "range not free"
        self.take_at(run, start - run, n)

    def put(self, block_id: int) -> None:
        """Return one block to free space, merging with neighbouring runs."""
        self.put_range(block_id, 1)

    def put_many(self, block_ids: list[int]) -> None:
        """Return blocks (any order) to free space: one merge per contiguous range."""
        block_ids.sort()
        i = 0
        while i < len(block_ids):
            j = i + 1
            while j < len(block_ids) and block_ids[j] == block_ids[j - 1] + 1:
                j += 1
            self.put_range(block_ids[i], j - i)
            i = j

    def put_range(self, block_id: int, n: int) -> None:
        """Return the empty range [block_id, block_id + n), merging with neighbouring runs."""
        start, length = block_id, n
        left = self._start_of_end.get(block_id)
        if left is not None:
            start = left
            length += self._remove_run(left)
        if block_id + n in self._len_at:
            length += self._remove_run(block_id + n)
        self._add_run(start, length)
