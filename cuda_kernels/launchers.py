"""Typed launchers for the CUDA kernels: check shapes, dtypes, strides; then launch.

Each launcher raises ValueError with a clear message for bad input, allocates its outputs and
temporaries with torch (stream-ordered on the current stream), and launches through
runtime.launch on torch's current stream. Semantics equal cuda_kernels.reference exactly
(tests/cuda_kernels/test_kernels_gpu.py checks them against it). Layouts: see ops.py.
"""

from __future__ import annotations

import math
import os

import torch

from cuda_kernels import runtime

VEC_TYPES = {16: "uint4", 8: "uint2", 4: "unsigned int", 2: "unsigned short"}
_TAGS = {torch.bfloat16: "bf16_t", torch.float16: "f16_t"}
_IDX_TYPES = {torch.int32: "int", torch.int64: "long long"}
_DECODE_HEAD_DIMS = (64, 128)
_DECODE_BLOCK_SIZES = (16, 32)
_NUM_WARPS = 4  # NOTE: must match NUM_WARPS / MMA_WARPS in the .cu files
_MMA_STAGES = 3  # NOTE: must match MMA_STAGES in paged_decode_mma.cu


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def vec_bytes(nbytes: list[int], max_width: int = 16) -> int:
    """Widest power-of-two width <= max_width dividing every size/stride/address given."""
    width = max_width
    while width > 1 and any(b % width for b in nbytes):
        width //= 2
    require(width >= 2, "tensors must be at least 2-byte aligned")
    return width


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    require(
        k_cache.dim() == 4,
        f"k_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)}",
    )
    require(
        v_cache.shape == k_cache.shape,
        f"v_cache shape {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}",
    )
    require(v_cache.dtype == k_cache.dtype, "k_cache and v_cache dtypes differ")
    require(
        k_cache.is_cuda and v_cache.device == k_cache.device, "caches must be on one CUDA device"
    )
    require(
        k_cache.is_contiguous() and v_cache.is_contiguous(),
        "caches must be contiguous (flash layout)",
    )


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, -1 = skip
) -> None:
    """CUDA reshape_and_cache (any dtype; key/value dtype must equal the cache dtype)."""
    _check_cache_pair(k_cache, v_cache)
    require(
        key.dim() == 3 and value.shape == key.shape,
        "key/value must be [num_tokens, num_kv_heads, head_dim] of equal shape",
    )
    require(
        key.shape[1:] == k_cache.shape[2:],
        f"key rows {tuple(key.shape[1:])} != cache rows {tuple(k_cache.shape[2:])}",
    )
    require(
        key.dtype == value.dtype == k_cache.dtype,
        f"dtype mismatch: key {key.dtype}, value {value.dtype}, cache {k_cache.dtype}",
    )
    require(
        key.device == value.device == k_cache.device == slot_mapping.device,
        "all tensors must be on the cache's device",
    )
    require(
        slot_mapping.dim() == 1 and slot_mapping.shape[0] == key.shape[0],
        "slot_mapping must be [num_tokens]",
    )
    require(
        slot_mapping.dtype in _IDX_TYPES,
        f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}",
    )
    heads, dim = key.shape[1], key.shape[2]
    for name, t in (("key", key), ("value", value)):
        require(
            t.stride(2) == 1 and t.stride(1) == dim,
            f"{name} rows [num_kv_heads, head_dim] must be contiguous",
        )
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    elt = key.element_size()
    row_bytes = heads * dim * elt
    width = vec_bytes(
        [
            row_bytes,
            key.stride(0) * elt,
            value.stride(0) * elt,
            key.data_ptr(),
            value.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
        ]
    )
    expr = f"reshape_and_cache_kernel<{VEC_TYPES[width]}, {_IDX_TYPES[slot_mapping.dtype]}>"
    kernel = runtime.get_kernel("cache_ops.cu", expr, key.device)
    args = (
        runtime.ptr(key),
        runtime.ptr(value),
        runtime.ptr(k_cache),
        runtime.ptr(v_cache),
        runtime.ptr(slot_mapping),
        runtime.i64(key.stride(0) * elt // width),
        runtime.i64(value.stride(0) * elt // width),
        runtime.i32(row_bytes // width),
    )
    runtime.launch(kernel, (num_tokens, 1, 1), (128, 1, 1), args, key.device)


def decode_supported(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when the CUDA decode kernel has an instantiation for this dtype/shape."""
    return (
        query.dtype in _TAGS
        and k_cache.dtype == query.dtype
        and k_cache.dim() == 4
        and k_cache.shape[3] in _DECODE_HEAD_DIMS
        and k_cache.shape[1] in _DECODE_BLOCK_SIZES
    )


def _choose_partition(work_items: int, max_len: int, num_sms: int) -> int:
    # NOTE: split-K: shrink partitions until the grid has >= 2 CTAs per SM (batch 1 with a
    # long context must still fill the GPU); 64 floors the partial-output traffic.
    for part in (512, 256, 128):
        if work_items * math.ceil(max_len / part) >= 2 * num_sms:
            return part
    return 64


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32; seq_lens[i] <= max_blocks * block_size
    scale: float,
    variant: str | None = None,
) -> torch.Tensor:
    """Split-K paged decode attention; returns a new [num_seqs, num_heads, head_dim] tensor.

    variant: "mma" (tensor cores, paged_decode_mma.cu; default) or "simt" (CUDA cores,
    paged_decode.cu); default from TINYSERVE_DECODE_KERNEL. Both share pass 2 and results
    agree to bf16 rounding.
    """
    variant = variant or os.environ.get("TINYSERVE_DECODE_KERNEL", "mma")
    require(variant in ("mma", "simt"), f"unknown decode variant {variant!r}")
    _check_cache_pair(k_cache, v_cache)
    require(
        decode_supported(query, k_cache),
        f"decode kernel supports fp16/bf16, head_dim {_DECODE_HEAD_DIMS}, block_size {_DECODE_BLOCK_SIZES}; got {query.dtype}, cache {tuple(k_cache.shape)}",
    )
    require(
        query.dim() == 3 and query.shape[2] == k_cache.shape[3],
        f"query must be [num_seqs, num_heads, {k_cache.shape[3]}], got {tuple(query.shape)}",
    )
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    require(
        num_heads % num_kv_heads == 0,
        f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}",
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
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0 or num_heads == 0:
        return out
    if query.stride(2) != 1 or query.stride(1) % 8 or query.stride(0) % 8 or query.data_ptr() % 16:
        query = query.clone(memory_format=torch.contiguous_format)  # NOTE: 16-byte row loads
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    group = num_heads // num_kv_heads
    # NOTE: query heads per CTA (all share one KV head): simt <= 4 (register budget), mma <= 16
    # (the MMA tile's rows).
    hg_max = 16 if variant == "mma" else 4
    hg = max(h for h in range(1, hg_max + 1) if group % h == 0)
    # NOTE: the table width bounds the context without reading seq_lens on the host (no sync,
    # CUDA-graph friendly); partitions past a sequence's end exit at once.
    max_len = block_tables.shape[1] * block_size
    if max_len == 0:
        return out.zero_()
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
    smem = 0
    if variant == "mma":
        sources: tuple[str, ...] = ("paged_decode.cu", "paged_decode_mma.cu")
        split_expr = f"paged_decode_mma_kernel<{tag}, {head_dim}, {block_size}>"
        smem = _MMA_STAGES * _NUM_WARPS * 2 * 16 * head_dim * query.element_size()
    else:
        sources = ("paged_decode.cu",)
        split_expr = f"paged_decode_split_kernel<{tag}, {head_dim}, {block_size}, {hg}>"
    split_k = runtime.get_kernel(sources, split_expr, device, (reduce_expr,))
    reduce_k = runtime.get_kernel(sources, reduce_expr, device, (split_expr,))
    runtime.allow_dynamic_smem(split_k, smem)
    args1 = (
        runtime.ptr(part_out),
        runtime.ptr(part_ml),
        runtime.ptr(query),
        runtime.ptr(k_cache),
        runtime.ptr(v_cache),
        runtime.ptr(block_tables),
        runtime.ptr(seq_lens),
        runtime.i64(query.stride(0)),
        runtime.i64(query.stride(1)),
        runtime.i64(k_cache.stride(0)),
        runtime.i64(k_cache.stride(1)),
        runtime.i32(block_tables.shape[1]),
        runtime.i32(num_heads),
        runtime.i32(group),
        runtime.i32(max_splits),
        runtime.i32(part),
        runtime.f32(scale * math.log2(math.e)),
    )
    if variant == "mma":
        args1 = (*args1, runtime.i32(hg))
    runtime.launch(
        split_k,
        (num_heads // hg, num_seqs, max_splits),
        (_NUM_WARPS * 32, 1, 1),
        args1,
        device,
        smem,
    )
    args2 = (
        runtime.ptr(out),
        runtime.ptr(part_out),
        runtime.ptr(part_ml),
        runtime.ptr(seq_lens),
        runtime.i32(num_heads),
        runtime.i32(max_splits),
        runtime.i32(part),
        runtime.i32(max_len),
    )
    runtime.launch(reduce_k, (num_heads, num_seqs, 1), (head_dim, 1, 1), args2, device)
    return out
