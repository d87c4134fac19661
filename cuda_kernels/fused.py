"""Typed launchers of the fused layer kernels (fused_ops.cu); semantics in fused_reference.

``supported_*`` say whether a CUDA instantiation applies (fp16/bf16, 16-byte aligned rows);
cuda_kernels.ops falls back to the reference otherwise. The launchers raise ValueError on
shapes that contradict each other.
"""

from __future__ import annotations

import torch

from cuda_kernels import runtime
from cuda_kernels.checks import require

_TAGS = runtime.DTYPE_TAGS
_IDX_TYPES = {torch.int32: "int", torch.int64: "long long"}
_SRC = "fused_ops.cu"


def _rows_aligned(t: torch.Tensor) -> bool:
    """2-D rows of contiguous elements, row stride and base 16-byte aligned."""
    elt = t.element_size()
    return (
        t.dim() == 2
        and t.stride(1) == 1
        and (t.stride(0) * elt) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def supported_rms_norm(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return (
        x.dtype in _TAGS
        and x.shape[-1] % 8 == 0
        and _rows_aligned(x)
        and (residual is None or (residual.dtype == x.dtype and _rows_aligned(residual)))
    )


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA rms_norm. With residual: x is overwritten with the output, residual with
    x + residual. Without: the output is a new tensor and x is returned as the residual."""
    hidden = x.shape[-1]
    require(weight.shape == (hidden,) and weight.dtype == x.dtype, "weight must be [hidden]")
    require(weight.is_contiguous(), "weight must be contiguous")
    require(residual is None or residual.shape == x.shape, "residual must be shaped like x")
    out = x if residual is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    res = x if residual is None else residual
    if x.shape[0] == 0:
        return out, res
    threads = min(1024, max(32, -(-(hidden // 8) // 32) * 32))
    kernel = runtime.get_kernel(_SRC, f"rms_norm_kernel<{_TAGS[x.dtype]}>", x.device)
    args = (
        runtime.ptr(out), runtime.ptr(x), runtime.ptr(res), runtime.ptr(weight),
        runtime.i64(out.stride(0)), runtime.i64(x.stride(0)), runtime.i64(res.stride(0)),
        runtime.i32(hidden), runtime.f32(eps), runtime.i32(residual is not None),
    )  # fmt: skip
    runtime.launch(kernel, (x.shape[0], 1, 1), (threads, 1, 1), args, x.device)
    return out, res


def _heads_rows(t: torch.Tensor) -> bool:
    """[num_tokens, heads, head_dim] with contiguous heads (token stride free)."""
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def supported_rope(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (
        q.dtype in _TAGS
        and k_cache.dtype == q.dtype
        and k_cache.is_contiguous()
        and q.shape[-1] % 2 == 0
    )


def rope_and_cache(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_table: torch.Tensor,  # [max_positions, head_dim] float32
    sin_table: torch.Tensor,
    positions: torch.Tensor,  # [num_tokens] int64
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, -1 = no write
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA rope_and_cache: q and k rotated in place; returns them."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    require(
        _heads_rows(q) and _heads_rows(k) and _heads_rows(v),
        "q/k/v must be [num_tokens, heads, head_dim] with contiguous heads",
    )
    require(
        k.shape == v.shape and k.shape[0] == n and k.shape[2] == head_dim,
        f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}",
    )
    require(
        k_cache.shape[2:] == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape,
        f"cache rows {tuple(k_cache.shape[2:])} != k rows {(num_kv_heads, head_dim)}",
    )
    require(k.dtype == v.dtype == q.dtype == k_cache.dtype == v_cache.dtype, "dtype mismatch")
    require(
        cos_table.dtype == sin_table.dtype == torch.float32
        and cos_table.shape[1] == head_dim
        and cos_table.is_contiguous()
        and sin_table.is_contiguous(),
        "cos/sin tables must be contiguous float32 [max_positions, head_dim]",
    )
    require(positions.dtype == torch.int64 and positions.shape == (n,), "positions: int64 [n]")
    require(
        slot_mapping.shape == (n,) and slot_mapping.dtype in _IDX_TYPES,
        "slot_mapping must be int32/int64 [num_tokens]",
    )
    if n == 0:
        return q, k
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    expr = f"rope_and_cache_kernel<{_TAGS[q.dtype]}, {_IDX_TYPES[slot_mapping.dtype]}>"
    kernel = runtime.get_kernel(_SRC, expr, q.device)
    args = (
        runtime.ptr(q), runtime.ptr(k), runtime.ptr(v), runtime.ptr(k_cache),
        runtime.ptr(v_cache), runtime.ptr(cos_table), runtime.ptr(sin_table),
        runtime.ptr(positions), runtime.ptr(slot_mapping),
        runtime.i64(q.stride(0)), runtime.i64(k.stride(0)), runtime.i64(v.stride(0)),
        runtime.i32(num_heads), runtime.i32(num_kv_heads), runtime.i32(head_dim),
    )  # fmt: skip
    runtime.launch(kernel, (n, 1, 1), (128, 1, 1), args, q.device)
    return q, k


def supported_silu_and_mul(gate_up: torch.Tensor) -> bool:
    return gate_up.dtype in _TAGS and gate_up.shape[-1] % 16 == 0 and _rows_aligned(gate_up)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """CUDA silu_and_mul over [num_tokens, 2 * intermediate]; returns a new tensor."""
    n, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
    if n == 0:
        return out
    kernel = runtime.get_kernel(
        _SRC, f"silu_and_mul_kernel<{_TAGS[gate_up.dtype]}>", gate_up.device
    )
    grid = (n, -(-(inter // 8) // 256), 1)
    args = (
        runtime.ptr(out), runtime.ptr(gate_up), runtime.i64(out.stride(0)),
        runtime.i64(gate_up.stride(0)), runtime.i32(inter),
    )  # fmt: skip
    runtime.launch(kernel, grid, (256, 1, 1), args, gate_up.device)
    return out
