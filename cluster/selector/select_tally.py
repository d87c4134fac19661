"""Counts of the compiled wire Selects, folded into the core's counters and Prometheus lazily.

The fused Select (``wire_select_kernel``) counts its decisions and unknown candidate ids in
``counts`` (``TALLY`` order) and the caller adds its latency here (``observe``: a bisect and
two list updates). Readers take deltas: ``take_counts`` for ``SelectorCore.counters``,
``export`` for the Prometheus families at scrape time (``SelectorMetrics.on_collect``).
NOTE: why: a Prometheus ``inc`` + ``observe`` per Select cost ~3-5 us (label lookups, locks);
here a Select pays nothing for its metrics beyond these counts, and a scrape pays once.

Contract: not thread-safe; the core calls every method under its lock.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

from cluster.selector.metrics import LATENCY_BUCKETS, SelectorMetrics
from cluster.selector.wire_select_kernel import TALLY

assert TALLY == ("selects", "unknown_replica")


class SelectTally:
    """Cumulative counts of one policy's fused Selects, and how much of them was taken."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.counts = np.zeros(len(TALLY), np.int64)  # NOTE: written by the kernel
        # NOTE: per LATENCY_BUCKETS bound, then +Inf; not cumulative (Prometheus' own layout)
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._taken = (0, 0)
        self._exported = (0, 0, [0] * len(self._latency), 0.0)

    def observe(self, seconds: float) -> None:
        """One Select's latency (Prometheus ``le`` semantics: the first bound >= it)."""
        self._latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds

    def take_counts(self) -> tuple[int, int]:
        """(selects, unknown candidate ids) counted since the last call."""
        now = (int(self.counts[0]), int(self.counts[1]))
        delta = (now[0] - self._taken[0], now[1] - self._taken[1])
        self._taken = now
        return delta

    def export(self, metrics: SelectorMetrics) -> None:
        """Add what was counted since the last export to ``metrics``' decisions, errors and
        latency families (the same totals as one ``inc`` / ``observe`` per Select)."""
        selects, unknown, latency, total = self._exported
        now_sel, now_unk = int(self.counts[0]), int(self.counts[1])
        if now_sel != selects:
            metrics.decisions.labels(self.policy).inc(now_sel - selects)
            child = metrics.select_latency.labels(self.policy)
            # NOTE: prometheus_client has no bulk observe; its children keep per-bucket
            # values and the sum (test_selector_wire_fused.py scrapes the totals)
            child._sum.inc(self._latency_sum - total)
            for i, (c, before) in enumerate(zip(self._latency, latency, strict=True)):
                if c != before:
                    child._buckets[i].inc(c - before)
        if now_unk != unknown:
            metrics.errors.labels("unknown_replica").inc(now_unk - unknown)
        self._exported = (now_sel, now_unk, list(self._latency), self._latency_sum)
