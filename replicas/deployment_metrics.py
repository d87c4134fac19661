"""The LLM replica's ``tinyserve_*`` metrics, through Ray Serve's metrics API.

Serve adds the ``deployment``, ``replica`` and ``application`` labels, and Ray exports every
series on its metrics port (``ray start --metrics-export-port``) with the ``ray_`` prefix,
next to Serve's own series, so Prometheus and the Ray dashboard see them per replica.

NOTE: counters are named without ``_total``: Ray's exporter appends it (Prometheus convention),
so ``tinyserve_prefix_hit_tokens`` is scraped as ``ray_tinyserve_prefix_hit_tokens_total``.
"""

from __future__ import annotations

from kvmanager.metrics import PoolStats
from replicas.outputs import RequestOutput
from replicas.sparse import SparseAttentionStats

# NOTE: seconds; CPU TTFTs reach seconds, GPU ones are milliseconds: one set covers both.
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class ReplicaMetrics:
    """Creates the series once per replica; every method is cheap and never raises."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.prompt_tokens = metrics.Counter(
            "tinyserve_prompt_tokens", description="Prompt tokens of finished requests."
        )
        self.prefix_hit_tokens = metrics.Counter(
            "tinyserve_prefix_hit_tokens",
            description="Prompt tokens served from the replica's prefix cache.",
        )
        self.generation_tokens = metrics.Counter(
            "tinyserve_generation_tokens", description="Generated (output) tokens."
        )
        self.requests = metrics.Counter(
            "tinyserve_requests",
            description="Finished requests by finish reason.",
            tag_keys=("finish_reason",),
        )
        self.ttft = metrics.Histogram(
            "tinyserve_time_to_first_token_seconds",
            description="Arrival at the engine to first output token.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.tpot = metrics.Histogram(
            "tinyserve_time_per_output_token_seconds",
            description="Mean time per output token after the first, per request.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self.queue_time = metrics.Histogram(
            "tinyserve_queue_time_seconds",
            description="Arrival at the engine to first scheduling.",
            boundaries=LATENCY_BUCKETS_S,
        )
        # NOTE: every gauge's help says its unit and range ("Unit: ...; range: ..."): a test
        # checks the scrape for it.
        self.num_requests_inflight = metrics.Gauge(
            "tinyserve_num_requests_inflight",
            description="Requests admitted by this replica and not finished (queue length). "
            "Unit: requests; range: 0 to the deployment's max_ongoing_requests.",
        )
        self.num_blocks = metrics.Gauge(
            "tinyserve_kv_num_blocks",
            description="KV blocks by state: empty (free runs and growth reservations), "
            "evictable (cached, ref_cnt 0), used (ref_cnt > 0); the states partition the pool. "
            "Unit: blocks; range: 0 to num_blocks, the three summing to num_blocks.",
            tag_keys=("state",),
        )
        self.cached_blocks = metrics.Gauge(
            "tinyserve_kv_cached_blocks",
            description="KV blocks holding a reusable prefix block_hash (evictable or used; "
            "not a state of its own). Unit: blocks; range: 0 to num_blocks.",
        )
        self.kv_usage = metrics.Gauge(
            "tinyserve_kv_usage_ratio",
            description="Used KV blocks / num_blocks (vLLM's usage: evictable blocks count as "
            "free). Unit: ratio; range: 0 to 1.",
        )
        self.kv_utilization = metrics.Gauge(
            "tinyserve_kv_utilization_ratio",
            description="Token slots holding real K/V / allocated slots of the used blocks "
            "(1 when none is used). Unit: ratio; range: 0 to 1.",
        )
        self.fragmentation = metrics.Gauge(
            "tinyserve_kv_fragmentation",
            description="Pool fragmentation by kind, 0 = none (kvmanager/fragmentation.py). "
            "Unit: dimensionless; range: external 0 to 1 (1 - largest free run / free "
            "blocks), f_spatial 0 to (free runs - 1) (distance-weighted squared CV of free "
            "run sizes), f_temporal 0 to 2 (access churn between epochs), f_access >= 0 "
            "(level entropy x latency dispersion, unbounded), f_total >= 0 (their weighted "
            "sum, unbounded).",
            tag_keys=("kind",),
        )
        self.sparse_pages = metrics.Counter(
            "tinyserve_sparse_pages",
            description="KV pages (blocks) seen by sparse decode attention: scored or selected.",
            tag_keys=("kind",),
        )
        self._sparse_seen = (0, 0)
        self.compactions = metrics.Counter(
            "tinyserve_kv_compactions", description="KV-pool compactions run between steps."
        )
        self.compacted_blocks = metrics.Counter(
            "tinyserve_kv_compacted_blocks", description="KV blocks moved by compactions."
        )
        self._compaction_seen = (0, 0)

    def on_finished(self, out: RequestOutput) -> None:
        """Account one finished request (its last output)."""
        self.prompt_tokens.inc(out.num_prompt_tokens)
        if out.num_cached_tokens:
            self.prefix_hit_tokens.inc(out.num_cached_tokens)
        if out.num_output_tokens:
            self.generation_tokens.inc(out.num_output_tokens)
        self.requests.inc(tags={"finish_reason": out.finish_reason or "unknown"})
        m = out.metrics
        if m.ttft_s is not None:
            self.ttft.observe(m.ttft_s)
        if m.tpot_s is not None:
            self.tpot.observe(m.tpot_s)
        if m.queue_time_s is not None:
            self.queue_time.observe(m.queue_time_s)

    def on_pool(self, stats: PoolStats, num_inflight: int) -> None:
        """Refresh the gauges from a pool snapshot."""
        self.num_requests_inflight.set(num_inflight)
        # NOTE: a partition of the pool (PoolStats' block accounting); "cached" overlaps
        # evictable and used, so it is a gauge of its own, not a state.
        block_counts: tuple[tuple[str, float], ...] = (
            ("empty", stats.num_empty_blocks),
            ("evictable", stats.num_evictable_blocks),
            ("used", stats.num_used_blocks),
        )
        for state, value in block_counts:
            self.num_blocks.set(value, tags={"state": state})
        self.cached_blocks.set(stats.num_cached_blocks)
        self.kv_usage.set(stats.usage)
        self.kv_utilization.set(stats.utilization)
        for kind, value in (
            ("f_total", stats.f_total),
            ("f_spatial", stats.f_spatial),
            ("f_temporal", stats.f_temporal),
            ("f_access", stats.f_access),
            ("external", stats.external_fragmentation),
        ):
            self.fragmentation.set(value, tags={"kind": kind})
        self.on_compaction(stats.num_compactions, stats.num_compacted_blocks)

    def on_compaction(self, num_compactions: int, num_blocks: int) -> None:
        """Advance the compaction counters to the pool's running totals."""
        seen_c, seen_b = self._compaction_seen
        if num_compactions > seen_c:
            self.compactions.inc(num_compactions - seen_c)
        if num_blocks > seen_b:
            self.compacted_blocks.inc(num_blocks - seen_b)
        self._compaction_seen = (num_compactions, num_blocks)

    def on_sparse(self, stats: SparseAttentionStats) -> None:
        """Advance the sparse-attention page counters to the engine's running totals."""
        scored, selected = stats.num_pages_scored_total, stats.num_pages_selected_total
        if scored > self._sparse_seen[0]:
            self.sparse_pages.inc(scored - self._sparse_seen[0], tags={"kind": "scored"})
        if selected > self._sparse_seen[1]:
            self.sparse_pages.inc(selected - self._sparse_seen[1], tags={"kind": "selected"})
        self._sparse_seen = (scored, selected)
