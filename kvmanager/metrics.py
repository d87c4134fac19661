"""Pool statistics snapshot (observability is data: one immutable dataclass per call)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kvmanager.fragmentation import external_fragmentation, f_spatial

if TYPE_CHECKING:
    from kvmanager.manager import KVCacheManager


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A point-in-time view of one pool.

    Block accounting: ``num_empty_blocks`` (no K/V; ``num_reserved_blocks`` of them are set
    aside as growth room of running requests) + ``num_evictable_blocks`` (cached,
    ref_cnt 0) + ``num_used_blocks`` (ref_cnt > 0) == ``num_blocks``. ``num_free_blocks`` is
    vLLM's "free": empty + evictable. ``num_cached_blocks`` counts every block that holds a
    reusable ``block_hash`` (evictable or in use).

    - usage: vLLM's meaning, used / total (evictable cached blocks count as free).
    - utilization: vLLM-paper utilisation of the blocks in use: token slots holding real K/V
      ÷ allocated slots (1.0 when nothing is allocated).
    - external_fragmentation: 1 − largest free run / blocks in free runs (reservations
      excluded: they are already placed).
    - f_spatial / f_temporal / f_access / f_total: the TinyServe fragmentation terms.
    - prefix_hit_tokens / prefix_query_tokens: prompt tokens served from cache / looked up.
    - num_split_allocations: allocations that started a new run of a request's own blocks
      (scattered, or not next to its last block); num_compactions / num_compacted_blocks:
      compactions applied and blocks they moved (running totals).
    """

    num_blocks: int
    block_size: int
    num_free_blocks: int
    num_empty_blocks: int
    num_reserved_blocks: int
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
    num_split_allocations: int = 0
    num_compactions: int = 0
    num_compacted_blocks: int = 0

    @property
    def prefix_hit_ratio(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefix_hit_ratio"] = self.prefix_hit_ratio
        return d


def pool_stats(mgr: KVCacheManager) -> PoolStats:
    """Build a PoolStats snapshot from a pool's internals."""
    cfg = mgr.config
    num_empty = mgr._alloc.num_empty
    num_evictable = len(mgr._evictable)
    num_used = mgr.num_blocks - num_empty - num_evictable
    # NOTE: a block shared by k tables is a full cached block, so summing each table's
    # computed tokens over-counts exactly (k - 1) * block_size per shared block.
    num_refs = sum(len(req.block_ids) for req in mgr._requests.values())
    computed = sum(
        min(req.num_computed_tokens, len(req.block_ids) * mgr.block_size)
        for req in mgr._requests.values()
    )
    filled = computed - (num_refs - num_used) * mgr.block_size
    allocated = num_used * mgr.block_size
    frontier = mgr.num_blocks - num_empty
    fs = f_spatial(mgr._free.runs(), frontier, mgr.num_blocks, cfg.frag_sigma)
    ft = mgr._epochs.f_temporal()
    fa = mgr._levels.f_access()
    return PoolStats(
        num_blocks=mgr.num_blocks,
        block_size=mgr.block_size,
        num_free_blocks=num_empty + num_evictable,
        num_empty_blocks=num_empty,
        num_reserved_blocks=mgr._alloc.num_reserved,
        num_evictable_blocks=num_evictable,
        num_used_blocks=num_used,
        num_cached_blocks=len(mgr._hash_to_block),
        num_free_runs=len(mgr._free),
        largest_free_run=mgr._free.largest(),
        num_requests=len(mgr._requests),
        usage=num_used / mgr.num_blocks,
        utilization=filled / allocated if allocated else 1.0,
        external_fragmentation=external_fragmentation(mgr._free.largest(), mgr._free.num_free),
        f_spatial=fs,
        f_temporal=ft,
        f_access=fa,
        f_total=cfg.frag_alpha * fs + cfg.frag_beta * ft + cfg.frag_gamma * fa,
        prefix_hit_tokens=mgr._prefix_hit_tokens,
        prefix_query_tokens=mgr._prefix_query_tokens,
        num_evicted_blocks=mgr._num_evicted,
        num_split_allocations=mgr._num_split_allocations,
        num_compactions=mgr._num_compactions,
        num_compacted_blocks=mgr._num_blocks_moved,
    )
