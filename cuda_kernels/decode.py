"""Paged decode attention launcher (split-K flash-decoding over block tables).

Contract: paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale)
returns a new [num_seqs, num_heads, head_dim] tensor equal (to bf16/fp16 rounding) to
reference.paged_decode_attention. Reads nothing on the host, so it can be captured in a CUDA
graph; seq_lens[i] must be <= block_tables.shape[1] * block_size (the kernels clamp to it).

Variants (TINYSERVE_DECODE_KERNEL or the `variant` argument):
- "mma"  (default) tensor cores, paged_decode_mma.cu, 3-stage cp.async ring;
- "simt" CUDA cores, paged_decode.cu.
Both write per-partition partials merged by paged_decode_reduce_kernel (pass 2).
"""

from __future__ import annotations

import math
import os

import torch

from cuda_kernels import runtime
from cuda_kernels.checks import check_cache_pair, require

_TAGS = runtime.DTYPE_TAGS
_HEAD_DIMS = (64, 128)
_BLOCK_SIZES = (16, 32)
_NUM_WARPS = 4  # NOTE: must match NUM_WARPS / MMA_WARPS in the .cu files
# NOTE: a 2-stage ring (64 KiB, 3 CTAs per SM) measured the same as 3 stages (2 per SM).
_MMA_STAGES = 3


def decode_supported(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when the CUDA decode kernels have an instantiation for this dtype/shape."""
    return (
        query.dtype in _TAGS
        and k_cache.dtype == query.dtype
        and k_cache.dim() == 4
        and k_cache.shape[3] in _HEAD_DIMS
        and k_cache.shape[1] in _BLOCK_SIZES
    )


def _choose_partition(work_items: int, max_len: int, num_sms: int) -> int:
    # NOTE: split-K: the largest partition whose grid still puts a CTA on every SM, so batch 1
    # with a long context fills the GPU in ONE wave of short CTAs (smaller partitions only
    # add waves and partial-output traffic). 64 = one CTA step of both kernels.
    for part in (512, 256, 128):
        if work_items * math.ceil(max_len / part) >= num_sms:
            return part
    return 64


def _check(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    check_cache_pair(k_cache, v_cache)
    require(
        decode_supported(query, k_cache),
        f"decode kernels support fp16/bf16, head_dim {_HEAD_DIMS}, block_size {_BLOCK_SIZES};"
        f" got {query.dtype}, cache {tuple(k_cache.shape)}",
    )
    require(
        query.dim() == 3 and query.shape[2] == k_cache.shape[3],
        f"query must be [num_seqs, num_heads, {k_cache.shape[3]}], got {tuple(query.shape)}",
    )
    num_seqs, num_heads = query.shape[0], query.shape[1]
    require(
        num_heads % k_cache.shape[2] == 0,
        f"num_heads {num_heads} not a multiple of num_kv_heads {k_cache.shape[2]}",
    )
    require(
        block_tables.dim() == 2
        and block_tables.shape[0] == num_seqs
        and block_tables.dtype == torch.int32,
        "block_tables must be int32 [num_seqs, max_blocks]",
    )
    require(
        seq_lens.shape == (num_seqs,) and seq_lens.dtype == torch.int32,
        "seq_lens must be int32 [num_seqs]",
    )
    require(
        query.device == k_cache.device == block_tables.device == seq_lens.device,
        "all tensors must be on the cache's device",
    )


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    variant: str | None = None,
    partition: int | None = None,
) -> torch.Tensor:
    """Split-K paged decode attention (module docstring); seq_len 0 rows give zeros.

    partition: tokens per CTA (64..512, multiple of 64); None = _choose_partition (tuning
    override for benchmarks).
    """
    variant = variant or os.environ.get("TINYSERVE_DECODE_KERNEL", "mma")
    require(variant in ("mma", "simt"), f"unknown decode variant {variant!r}")
    _check(query, k_cache, v_cache, block_tables, seq_lens)
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    # NOTE: the table width bounds the context without reading seq_lens on the host (no sync,
    # CUDA-graph friendly); partitions past a sequence's end exit at once.
    max_len = block_tables.shape[1] * block_size
    if num_seqs == 0 or num_heads == 0 or max_len == 0:
        return out.zero_()
    if query.stride(2) != 1 or query.stride(1) % 8 or query.stride(0) % 8 or query.data_ptr() % 16:
        query = query.clone(memory_format=torch.contiguous_format)  # NOTE: 16-byte row loads
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    group = num_heads // num_kv_heads
    mma = variant != "simt"
    # NOTE: query heads per CTA (all share one KV head): mma <= 16 (the MMA tile's rows),
    # simt <= 4 (register budget).
    hg = max(h for h in range(1, (16 if mma else 4) + 1) if group % h == 0)
    device = query.device
    part = _choose_partition(
        num_seqs * num_heads // hg, max_len, runtime.num_sms(device.index or 0)
    )
    max_splits = math.ceil(max_len / part)
    part_out = torch.empty(
        (num_seqs, num_heads, max_splits, head_dim), dtype=torch.float32, device=device
    )
    part_ml = torch.empty((num_seqs, num_heads, max_splits, 2), dtype=torch.float32, device=device)
    tag = _TAGS[query.dtype]
    reduce_expr = f"paged_decode_reduce_kernel<{tag}, {head_dim}>"
    tail = (
        runtime.ptr(query), runtime.ptr(k_cache), runtime.ptr(v_cache),
        runtime.ptr(block_tables), runtime.ptr(seq_lens),
        runtime.i64(query.stride(0)), runtime.i64(query.stride(1)),
        runtime.i64(k_cache.stride(0)), runtime.i64(k_cache.stride(1)),
        runtime.i32(block_tables.shape[1]), runtime.i32(num_heads), runtime.i32(group),
        runtime.i32(max_splits), runtime.i32(part), runtime.f32(scale * math.log2(math.e)),
    )  # fmt: skip
    grid = (num_heads // hg, num_seqs, max_splits)
    block = (_NUM_WARPS * 32, 1, 1)
    sources: tuple[str, ...] = ("paged_decode.cu",)
    smem = 0
    if mma:
        sources = ("paged_decode.cu", "paged_decode_mma.cu")
        stages = _MMA_STAGES
        expr = f"paged_decode_mma_kernel<{tag}, {head_dim}, {block_size}, {stages}>"
        smem = stages * _NUM_WARPS * 2 * 16 * head_dim * query.element_size()
        tail = (*tail, runtime.i32(hg))
    else:
        expr = f"paged_decode_split_kernel<{tag}, {head_dim}, {block_size}, {hg}>"
    split_k = runtime.get_kernel(sources, expr, device, (reduce_expr,))
    reduce_k = runtime.get_kernel(sources, reduce_expr, device, (expr,))
    runtime.allow_dynamic_smem(split_k, smem)
    args1 = (runtime.ptr(part_out), runtime.ptr(part_ml), *tail)
    runtime.launch(split_k, grid, block, args1, device, smem)
    args2 = (runtime.ptr(out), runtime.ptr(part_out), runtime.ptr(part_ml), runtime.ptr(seq_lens),
             runtime.i32(num_heads), runtime.i32(max_splits), runtime.i32(part), runtime.i32(max_len))  # fmt: skip
    runtime.launch(reduce_k, (num_heads, num_seqs, 1), (head_dim, 1, 1), args2, device)
    return out
