"""Prometheus metrics of the selection service (``tinyserve_selector_*``, units in names).

Each ``SelectorMetrics`` owns its own ``CollectorRegistry`` so several cores (tests, the
simulator) can coexist in one process; ``python -m cluster.selector --metrics-port`` serves it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# NOTE: service-side compute per Select is tens of microseconds; default buckets start at 5 ms.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 1e-1)


class _BeforeCollect(Collector):
    """Yields nothing; runs the hooks first, so counts kept outside Prometheus (the compiled
    Select's, ``select_tally``) are folded in before any family is read."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def collect(self) -> Iterator[Metric]:
        for hook in self.hooks:
            hook()
        return iter(())


class SelectorMetrics:
    """All metric families of one selector core."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # NOTE: registered first: a registry collects in registration order
        self._before = _BeforeCollect()
        r.register(self._before)
        self.select_latency = Histogram(
            "tinyserve_selector_select_latency_seconds",
            "Service-side compute time of one Select (index walk + policy).",
            ["policy"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "tinyserve_selector_decisions_total",
            "Select decisions by policy.",
            ["policy"],
            registry=r,
        )
        self.predicted_hit_tokens = Counter(
            "tinyserve_selector_predicted_hit_tokens_total",
            "Prefix tokens the index predicted cached on the chosen replica (requests with Feedback).",
            registry=r,
        )
        self.realised_hit_tokens = Counter(
            "tinyserve_selector_realised_hit_tokens_total",
            "Cached tokens the replica reported in Feedback (same requests as predicted).",
            registry=r,
        )
        self.index_blocks = Gauge(
            "tinyserve_selector_index_blocks",
            "Resident blocks indexed per replica. Unit: blocks; range: 0 to the replica's "
            "pool (num_blocks, plus its host tier if any).",
            ["replica_id"],
            registry=r,
        )
        self.unique_blocks = Gauge(
            "tinyserve_selector_index_unique_blocks",
            "Distinct block hashes in the index. Unit: blocks; range: 0 to the sum of the "
            "replicas' pools.",
            registry=r,
        )
        self.replicas = Gauge(
            "tinyserve_selector_replicas",
            "LLM replicas the service knows (connected or not yet expired). Unit: replicas; "
            "range: >= 0.",
            registry=r,
        )
        self.block_events = Counter(
            "tinyserve_selector_block_events_total",
            "Block events applied to the index, by kind (stored/removed/cleared).",
            ["kind"],
            registry=r,
        )
        self.resyncs = Counter(
            "tinyserve_selector_resyncs_total", "Full resyncs applied.", registry=r
        )
        self.errors = Counter(
            "tinyserve_selector_errors_total",
            "Rejected or ignored input by kind (invalid_argument, malformed, unknown_replica, "
            "seq_gap, unauthenticated, internal).",
            ["kind"],
            registry=r,
        )
        self.fast_lane_connections = Gauge(
            "tinyserve_selector_fast_lane_connections",
            "Open connections to the Select fast lane (routers' clients; 0 while they use "
            "gRPC). Unit: connections; range: >= 0.",
            registry=r,
        )

    def on_collect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at the start of every collection of this registry (a scrape,
        ``get_sample_value``, the Ray mirror), before any family is read."""
        self._before.hooks.append(hook)
