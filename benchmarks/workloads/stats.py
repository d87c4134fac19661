"""Shape statistics of a workload (used by tests and printed by the benchmark).

``ideal_cache_ratio`` is the prompt-token hit ratio of ONE replica with an infinite cache that
sees the requests in list order: a prompt block hits when the same chain prefix (same blocks
in the same order from the start) was computed before, by an earlier prompt or by an earlier
answer (full output blocks, as the engine caches them). Like the pool, at most
``len(prompt) - 1`` blocks can hit (one token is always recomputed). It is an upper bound for
any routing policy's hit ratio on any cluster size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.workloads.types import Workload


@dataclass(slots=True, frozen=True)
class WorkloadStats:
    num_requests: int
    duration_s: float
    mean_prompt_tokens: float
    p50_prompt_tokens: float
    p99_prompt_tokens: float
    mean_output_tokens: float
    ideal_cache_ratio: float
    num_unique_blocks: int
    num_sessions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def workload_stats(workload: Workload) -> WorkloadStats:
    """Compute the shape statistics (O(total blocks))."""
    bs = workload.block_size
    trie: dict[tuple[int, int], int] = {}
    hit_blocks = total_blocks = 0
    for req in workload.requests:
        node, hits, matching = 0, 0, True
        limit = len(req.prompt_blocks) - 1
        computed = req.prompt_blocks + req.output_blocks[: (req.num_output_tokens - 1) // bs]
        for i, content in enumerate(computed):
            key = (node, content)
            child = trie.get(key)
            if child is None:
                matching = False
                child = len(trie) + 1
                trie[key] = child
            elif matching and i < limit:
                hits += 1
            node = child
        hit_blocks += hits
        total_blocks += len(req.prompt_blocks)
    prompts = np.asarray([len(r.prompt_blocks) * bs for r in workload.requests], np.float64)
    outputs = np.asarray([r.num_output_tokens for r in workload.requests], np.float64)
    arrivals = [r.arrival_s for r in workload.requests]
    return WorkloadStats(
        num_requests=len(workload.requests),
        duration_s=float(max(arrivals) - min(arrivals)) if arrivals else 0.0,
        mean_prompt_tokens=float(prompts.mean()) if len(prompts) else 0.0,
        p50_prompt_tokens=float(np.percentile(prompts, 50)) if len(prompts) else 0.0,
        p99_prompt_tokens=float(np.percentile(prompts, 99)) if len(prompts) else 0.0,
        mean_output_tokens=float(outputs.mean()) if len(outputs) else 0.0,
        ideal_cache_ratio=hit_blocks / total_blocks if total_blocks else 0.0,
        num_unique_blocks=len(trie),
        num_sessions=len({r.session_id for r in workload.requests}),
    )
