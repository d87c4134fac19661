"""TinyServe fragmentation terms (ARCHITECTURE.md, "TinyServe formulas as published").

    F_total    = α·F_spatial + β·F_temporal + γ·F_access
    F_spatial  = (1/N) Σ_i ((r_i − r̄)/r̄)² · exp(−d_i/σ²)
    F_temporal = Σ_t w_t · ( Σ_j |A_{t,j} − A_{t−1,j}| / (M·Ā) )
    F_access   = −Σ_k p_k·log2(p_k) · Var(L_k)/L̄²

Symbol mapping (ours):
- r_i: length of free run i (N runs). d_i: distance of run i from the compaction frontier
  (the id where free space would begin if every held block were packed at the low end),
  normalised by num_blocks, so d_i ∈ [0, 1]: holes deep inside the used region count less
  than scattered free space near the frontier, which is what an allocator trips over.
- A_{t,j}: accesses (allocations, prefix hits, stores) of block j in epoch t; epochs are
  ``epoch_ops`` pool operations long; w_t geometric (½ per epoch back, normalised), so recent
  churn weighs more; M: blocks touched in either epoch; Ā: mean of A over those entries.
- k ∈ {device hit, recompute}: p_k the share of prompt tokens served by each level,
  L_k the latencies the engine observed for that level (``observe_latency``); L̄ the mean over
  all levels. With a single level (no hits or no misses) the entropy is 0 and so is F_access.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Iterable


def f_spatial(runs: Iterable[tuple[int, int]], frontier: int, num_blocks: int, sigma: float) -> float:
    """Free-run size dispersion weighted by distance from the compaction frontier."""
    items = list(runs)
    if len(items) < 2:
        return 0.0
    mean = sum(length for _, length in items) / len(items)
    total = 0.0
    for start, length in items:
        d = abs(start - frontier) / num_blocks
        total += ((length - mean) / mean) ** 2 * math.exp(-d / (sigma * sigma))
    return total / len(items)


class AccessEpochs:
    """Per-block access counts over the last ``num_epochs`` closed epochs plus the open one."""

    def __init__(self, epoch_ops: int, num_epochs: int) -> None:
        self.epoch_ops = epoch_ops
        self._closed: deque[Counter[int]] = deque(maxlen=num_epochs + 1)
        self._open: Counter[int] = Counter()
        self._ops = 0

    def record(self, block_ids: Iterable[int]) -> None:
        self._open.update(block_ids)

    def rename(self, remap: dict[int, int]) -> None:
        """Compaction moved blocks (old -> new, all at once): their counts move with them, so
        a move is not read as access churn."""
        if not remap:
            return
        for counts in [*self._closed, self._open]:
            moved = {b: counts.pop(b) for b in remap if b in counts}
            for b, c in moved.items():
                counts[remap[b]] = c

    def tick(self) -> None:
        """One pool operation; closes the epoch every ``epoch_ops`` ticks."""
        self._ops += 1
        if self._ops % self.epoch_ops == 0:
            self._closed.append(self._open)
            self._open = Counter()

    def f_temporal(self) -> float:
        epochs = list(self._closed)
        if len(epochs) < 2:
            return 0.0
        pairs = list(itertools.pairwise(epochs))  # (t−1, t), oldest first
        raw = [0.5 ** (len(pairs) - 1 - i) for i in range(len(pairs))]
        norm = sum(raw)
        total = 0.0
        for w, (prev, cur) in zip(raw, pairs, strict=True):
            keys = prev.keys() | cur.keys()
            if not keys:
                continue
            m = len(keys)
            mean = (sum(prev.values()) + sum(cur.values())) / (2 * m)
            churn = sum(abs(cur.get(j, 0) - prev.get(j, 0)) for j in keys)
            total += (w / norm) * churn / (m * mean)
        return total


class LevelLatencies:
    """Token counts and recent latencies per cache level, for F_access."""

    LEVELS = ("device", "recompute")

    def __init__(self, window: int = 256) -> None:
        self.tokens = dict.fromkeys(self.LEVELS, 0)
        self.latencies: dict[str, deque[float]] = {k: deque(maxlen=window) for k in self.LEVELS}

    def f_access(self) -> float:
        total = sum(self.tokens.values())
        all_lat = [x for d in self.latencies.values() for x in d]
        if total == 0 or not all_lat:
            return 0.0
        mean_all = sum(all_lat) / len(all_lat)
        if mean_all <= 0:
            return 0.0
        out = 0.0
        for level in self.LEVELS:
            p = self.tokens[level] / total
            lat = self.latencies[level]
            if p <= 0 or len(lat) < 2:
                continue
            m = sum(lat) / len(lat)
            var = sum((x - m) ** 2 for x in lat) / len(lat)
            out += -p * math.log2(p) * var / (mean_all * mean_all)
        return out


def external_fragmentation(largest_run: int, num_free: int) -> float:
    """1 − largest free run / free blocks (0 when free space is one run or empty)."""
    return 0.0 if num_free == 0 else 1.0 - largest_run / num_free
