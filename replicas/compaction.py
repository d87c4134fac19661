"""Compaction in the engine: between steps or at idle, when allocations broke sequences'
contiguity.

    LLMEngine.step():  maybe_compact()  ->  schedule  ->  forward  ->  sample  -> ...
                       ^ no step is in flight, no chunk holds a block table
    engine core idle:  check_idle()  ->  maybe_compact_idle()  (nothing running at all)

Where (``CompactionConfig.when``): between steps (CPU default), or only once the replica is
idle (CUDA default: the paged kernels gain nothing from contiguity, and a compaction under a
running batch stalls it; ``maybe_compact_idle``, called by the engine core's idle check).

Trigger (``CompactionConfig``): the pool counts allocations that started a new run of a
request's private blocks (``PoolStats.num_split_allocations``: best fit found no run for the
request, or its growth room was cut). Once ``min_split_allocations`` of them have happened
since the last compaction and ``min_interval_steps`` steps have passed, the engine compacts:
``KVCacheManager.plan_contiguous_compaction`` gathers each split private tail (and its growth
room) into one run, the K/V moves, the pool rewrites its tables. A pool whose allocations all
stay contiguous never pays for a compaction.

Execution (``Compactor.compact``):
1. plan (pool, host only);
2. data: ``ops.copy_blocks`` over every layer's K and V (the batched block-copy kernel on CUDA,
   the torch reference on CPU), then over the sparse page metadata (``SparseAttention.
   metadata_tensors()``: per block key min/max), with the plan's ordered moves;
3. the persistent device block tables of the CUDA graphs are remapped on the same stream
   (``DecodeGraphs.remap_block_tables``), so a replay never reads a moved id;
4. the pool's bookkeeping (``apply_compaction``, done first: it validates the plan before any
   data moves): block tables, ref counts, hash map, free space, reservations, all at once. No
   KV event: every block hash stays resident (see kvmanager.compaction), so the selection
   service's view is still exact.
Steps 2-4 run on the engine thread under the engine lock, with every GPU op on the current
stream after the previous step's kernels: nothing reads a table while it changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cuda_kernels import ops
from kvmanager.compaction import CompactionPlan
from kvmanager.manager import KVCacheManager
from replicas.config import CompactionConfig
from replicas.model_runner import ModelRunner


@dataclass(frozen=True, slots=True)
class CompactionStats:
    """Running totals of one engine's compactions (exported as ``tinyserve_kv_*`` metrics)."""

    num_compactions_total: int = 0
    num_blocks_moved_total: int = 0
    seconds_total: float = 0.0
    last_num_blocks_moved: int = 0
    last_seconds: float = 0.0


class Compactor:
    """Owns the trigger and runs compactions over one pool and its runner's tensors."""

    def __init__(self, kv: KVCacheManager, runner: ModelRunner, config: CompactionConfig) -> None:
        self.kv = kv
        self.runner = runner
        self.config = config
        self.stats = CompactionStats()
        self._num_steps = 0
        self._last_step = 0
        self._splits_seen = 0
        when = config.when or ("idle" if runner.device.type == "cuda" else "between_steps")
        self.between_steps = when == "between_steps"

    def should_compact(self) -> bool:
        """The trigger (module docstring); O(1), read between steps."""
        cfg = self.config
        splits = self.kv.num_split_allocations - self._splits_seen
        return (
            cfg.enabled
            and splits >= cfg.min_split_allocations
            and self._num_steps - self._last_step >= cfg.min_interval_steps
        )

    def maybe_compact(self, before: Callable[[], object] | None = None) -> bool:
        """Call once between steps (the engine does, holding its lock). True if it compacted;
        ``before`` runs first when it will (asynchronous scheduling: resolve the step in
        flight, so that nothing reads the tables while blocks move)."""
        self._num_steps += 1
        if not self.between_steps or not self.should_compact():
            return False
        if before is not None:
            before()
        self.compact()
        return True

    def maybe_compact_idle(self) -> bool:
        """Call when the engine is idle (nothing running, nothing in flight; the engine core
        does, holding the engine's lock). True if it compacted. With ``when='idle'`` this is
        the only place the trigger is checked."""
        if self.between_steps or not self.should_compact():
            return False
        self.compact()
        return True

    def compact(self, plan: CompactionPlan | None = None) -> int:
        """Execute one compaction now (between steps): ``plan``, or the pool's contiguous
        plan when None (a plan must be fresh: made after the last step). Returns the
        blocks moved."""
        start = time.perf_counter()
        if plan is None:
            plan = self.kv.plan_contiguous_compaction(
                self.config.keep_free_blocks, self.config.full_layout_after
            )
        # NOTE: bookkeeping first: it validates the plan (ValueError, nothing changed) before
        # any data moves; nothing reads the pool or the caches until this method returns.
        remap = self.kv.apply_compaction(plan)
        if plan.moves:
            src = torch.tensor([s for s, _ in plan.moves], dtype=torch.long)
            dst = torch.tensor([d for _, d in plan.moves], dtype=torch.long)
            move_blocks(self.runner, src, dst)
        if remap and self.runner.graphs is not None:
            self.runner.graphs.remap_block_tables(remap, self.kv.num_blocks)
        if self.config.verify:
            self.kv.check_integrity()
        self._last_step = self._num_steps
        self._splits_seen = self.kv.num_split_allocations
        seconds = time.perf_counter() - start
        s = self.stats
        self.stats = CompactionStats(
            s.num_compactions_total + bool(remap),
            s.num_blocks_moved_total + len(remap),
            s.seconds_total + seconds,
            len(remap),
            seconds,
        )
        return len(remap)


def move_blocks(runner: ModelRunner, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Ordered block moves (sequential semantics; CPU int64 ``src``/``dst``) over every
    layer's K and V and the sparse page metadata of ``runner``. Mutates those tensors."""
    caches = [t for pair in runner.kv_caches for t in pair]
    ops.copy_blocks(caches, src, dst)
    if runner.sparse is not None:
        ops.copy_blocks(runner.sparse.metadata_tensors(), src, dst)
