"""Per-request records and the summary of one simulated run (JSON-ready)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True, frozen=True)
class RequestRecord:
    request_id: str
    replica_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    num_preemptions: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


@dataclass(slots=True)
class RunSummary:
    """Figures of one (workload, policy, cluster size, seed) run.

    - ttft_*: time to first token percentiles (seconds), over every request.
    - throughput_tok_s: output tokens / (last completion - first arrival).
    - hit_ratio: Σ prefix_hit_tokens / Σ prefix_query_tokens read from the pools' own stats
      (re-admissions after preemption count again, as in the engine).
    - request_hit_ratio: cached prompt tokens at first admission / prompt tokens.
    - imbalance: max / mean over replicas of tokens processed (prefill + decode), 1.0 = even.
    - usage / utilization / external_fragmentation / f_total: time averages of sampled
      ``PoolStats`` (see kvmanager.metrics).
    - stage_throughput_tok_s: output tokens completed inside each QPS stage / stage length.
    - offered_load_req_s / offered_load_tok_s: requests and (prompt + output) tokens offered
      per second over the arrival span (first to last arrival, closed-loop turns included).
    - cluster_utilization: mean over replicas of time spent in steps / makespan (1.0 = every
      replica busy all the time: saturated; compare with the offered load).
    """

    workload: str
    policy: str
    num_replicas: int
    seed: int
    num_requests: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    ttft_mean_s: float
    e2e_p99_s: float
    throughput_tok_s: float
    throughput_req_s: float
    hit_ratio: float
    request_hit_ratio: float
    imbalance: float
    usage: float
    utilization: float
    external_fragmentation: float
    f_total: float
    num_preemptions: int
    num_evicted_blocks: int
    makespan_s: float
    sim_wall_s: float
    stage_throughput_tok_s: list[float] = field(default_factory=list)
    offered_load_req_s: float = 0.0
    offered_load_tok_s: float = 0.0
    cluster_utilization: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def stage_throughput(
    finish_s: np.ndarray, output_tokens: np.ndarray, stages: list[tuple[float, float, float]]
) -> list[float]:
    """Output tokens of requests completed inside each stage window / window length
    (``finish_s`` and ``output_tokens`` are per-request columns)."""
    if not stages:
        return []
    tokens = np.asarray(output_tokens, np.float64)
    out = []
    for t0, t1, _ in stages:
        mask = (finish_s >= t0) & (finish_s < t1)
        out.append(float(tokens[mask].sum() / (t1 - t0)))
    return out
