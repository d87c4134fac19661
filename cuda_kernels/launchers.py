"""Typed launchers for the CUDA kernels: check shapes, dtypes, strides; then launch.

Each launcher raises ValueError with a clear message for bad input, allocates its outputs and
temporaries with torch (stream-ordered on the current stream), and launches through
runtime.launch on torch's current stream. Semantics equal cuda_kernels.reference
(tests/cuda_kernels/test_kernels_gpu.py checks them against it). Layouts: see ops.py.
This module holds reshape_and_cache and re-exports the decode launcher (decode.py) and the
block copy (block_copy.py).
"""

from __future__ import annotations

import torch

from cuda_kernels import runtime
from cuda_kernels.block_copy import copy_blocks, plan_block_copies
from cuda_kernels.checks import VEC_TYPES, check_cache_pair, require, vec_bytes
from cuda_kernels.decode import decode_supported, paged_decode_attention

_IDX_TYPES = {torch.int32: "int", torch.int64: "long long"}


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, -1 = skip
) -> None:
    """CUDA reshape_and_cache (any dtype; key/value dtype must equal the cache dtype)."""
    check_cache_pair(k_cache, v_cache)
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


__all__ = [
    "copy_blocks",
    "decode_supported",
    "paged_decode_attention",
    "plan_block_copies",
    "reshape_and_cache",
]
