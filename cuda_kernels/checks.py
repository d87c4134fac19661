"""Input checks shared by the CUDA launchers (ValueError with a clear message)."""

from __future__ import annotations

import torch

VEC_TYPES = {16: "uint4", 8: "uint2", 4: "unsigned int", 2: "unsigned short"}


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


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
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
