"""Pool statistics snapshot (observability is data: one immutable dataclass per call)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A point-in-time view of one pool.

    Block accounting: ``num_empty_blocks`` (no K/V) + ``num_evictable_blocks`` (cached,
    ref_cnt 0) + ``num_used_blocks`` (ref_cnt > 0) == ``num_blocks``. ``num_free_blocks`` is
    vLLM's "free": empty + evictable. ``num_cached_blocks`` counts every block that holds a
    reusable ``block_hash`` (evictable or in use).

    - usage: vLLM's meaning, used / total (evictable cached blocks count as free).
    - utilization: vLLM-paper utilisation of the blocks in use: token slots holding real K/V
      ÷ allocated slots (1.0 when nothing is allocated).
    - external_fragmentation: 1 − largest empty run / empty blocks.
    - f_spatial / f_temporal / f_access / f_total: the TinyServe fragmentation terms.
    - prefix_hit_tokens / prefix_query_tokens: prompt tokens served from cache / looked up.
    """

    num_blocks: int
    block_size: int
    num_free_blocks: int
    num_empty_blocks: int
    num_evictable_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    num_free_runs: int
    largest_free_run: int
    num_requests: int
    usage: float
    utilization: float
    external_fragmentation: float
    f_spatial: float
    f_temporal: float
    f_access: float
    f_total: float
    prefix_hit_tokens: int
    prefix_query_tokens: int
    num_evicted_blocks: int

    @property
    def prefix_hit_ratio(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefix_hit_ratio"] = self.prefix_hit_ratio
        return d
