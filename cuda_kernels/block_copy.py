"""Batched block copy on CUDA (compaction moves, copy-on-write): plan once, launch one kernel.

Contract:
- plan_block_copies(kv_caches, src, dst) validates, resolves the ordered moves into a parallel
  gather (reference.resolve_block_copies: sequential semantics, overlap-safe), uploads the
  index lists with one async pinned H2D copy and returns a BlockCopyPlan. The plan holds the
  device buffers it needs; it stays valid while the caches are not reallocated.
- BlockCopyPlan.run() launches on torch's current stream. No host work, so a plan built
  outside capture can be replayed inside a CUDA graph.
- copy_blocks(kv_caches, src, dst) = plan + run (what ops.copy_blocks calls on CUDA).

Launches: one when no resolved source block is also a destination; otherwise the hazardous
sources are staged in a scratch buffer first (stage, direct moves, unstage: three launches).
src/dst are read on the host: pass CPU tensors to avoid a device sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cuda_kernels import reference, runtime
from cuda_kernels.checks import VEC_TYPES, require, vec_bytes

_THREADS = 256


@dataclass(slots=True)
class _CopyStep:
    kernel: Any
    grid: tuple[int, int, int]
    args: tuple[Any, ...]


@dataclass(slots=True)
class BlockCopyPlan:
    """Prepared launches of one copy_blocks call; run() may be called again (same effect)."""

    device: torch.device
    num_pairs: int
    num_staged: int
    steps: list[_CopyStep] = field(default_factory=list)
    keep_alive: list[torch.Tensor] = field(default_factory=list)  # device buffers the args use

    def run(self) -> None:
        for step in self.steps:
            runtime.launch(step.kernel, step.grid, (_THREADS, 1, 1), step.args, self.device)


def _bases(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def plan_block_copies(
    kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor
) -> BlockCopyPlan:
    """Validate and prepare copy_blocks launches (see module docstring)."""
    require(len(kv_caches) > 0, "kv_caches is empty")
    first = kv_caches[0]
    require(first.is_cuda and first.dim() >= 1, "caches must be CUDA tensors indexed by block_id")
    for c in kv_caches:
        require(
            c.shape == first.shape and c.dtype == first.dtype and c.device == first.device,
            "all caches must share shape, dtype and device",
        )
        require(c.is_contiguous(), "caches must be contiguous")
    require(
        src.dim() == 1 and dst.dim() == 1 and src.shape == dst.shape,
        "src and dst must be 1-D of equal length",
    )
    src_ids, dst_ids = reference.resolve_block_copies(
        [int(x) for x in src.tolist()], [int(x) for x in dst.tolist()]
    )
    device = first.device
    plan = BlockCopyPlan(device=device, num_pairs=len(src_ids), num_staged=0)
    if not src_ids:
        return plan
    num_blocks, num_caches = first.shape[0], len(kv_caches)
    require(
        all(0 <= b < num_blocks for b in src_ids + dst_ids),
        f"block ids must be in [0, {num_blocks})",
    )
    block_bytes = first[0].numel() * first.element_size()
    written = set(dst_ids)
    direct = [(s, d) for s, d in zip(src_ids, dst_ids, strict=True) if s not in written]
    staged = [(s, d) for s, d in zip(src_ids, dst_ids, strict=True) if s in written]
    plan.num_staged = len(staged)
    cache_bases = _bases(kv_caches)
    scratch_bases: list[int] = []
    if staged:
        scratch = torch.empty(
            (num_caches, len(staged), *first.shape[1:]), dtype=first.dtype, device=device
        )
        plan.keep_alive.append(scratch)
        scratch_bases = [
            scratch.data_ptr() + i * scratch.stride(0) * scratch.element_size()
            for i in range(num_caches)
        ]
    width = vec_bytes([block_bytes, *cache_bases, *scratch_bases])
    kernel = runtime.get_kernel("cache_ops.cu", f"copy_blocks_kernel<{VEC_TYPES[width]}>", device)

    # NOTE: every index list of every launch goes into ONE pinned buffer and ONE async H2D
    # copy: a pageable copy would stall the host behind all queued GPU work.
    host: list[int] = []
    spans: list[tuple[int, int, int, int, int]] = []  # offsets: src_b, dst_b, src, dst, n

    def add(src_b: list[int], dst_b: list[int], s: list[int], d: list[int]) -> None:
        off = len(host)
        host.extend(src_b + dst_b + s + d)
        spans.append(
            (off, off + num_caches, off + 2 * num_caches, off + 2 * num_caches + len(s), len(s))
        )

    n_st = len(staged)
    if staged:  # stage first: the direct moves may overwrite these sources
        add(cache_bases, scratch_bases, [s for s, _ in staged], list(range(n_st)))
    if direct:
        add(cache_bases, cache_bases, [s for s, _ in direct], [d for _, d in direct])
    if staged:
        add(scratch_bases, cache_bases, list(range(n_st)), [d for _, d in staged])
    buf = torch.tensor(host, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    plan.keep_alive.append(buf)
    elt = buf.element_size()
    for sb, db, s, d, n in spans:
        args = (
            runtime.ptr_at(buf, sb * elt),
            runtime.ptr_at(buf, db * elt),
            runtime.ptr_at(buf, s * elt),
            runtime.ptr_at(buf, d * elt),
            runtime.i64(block_bytes // width),
        )
        plan.steps.append(_CopyStep(kernel, (n, num_caches, 1), args))
    return plan


def copy_blocks(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Batched block copy over all caches, sequential semantics (reference.copy_blocks)."""
    if not kv_caches:
        return
    plan_block_copies(kv_caches, src, dst).run()
