"""Pure-torch references of the fused layer kernels (fused_ops.cu); also the CPU path.

The arithmetic follows Hugging Face transformers step by step (norm in float32, cos/sin cast
to the activation dtype, ``rotate_half`` layout), so greedy decoding is token-identical to it.

Contracts (shared with cuda_kernels.fused, the CUDA launchers)::

    rms_norm(x, weight, eps, residual=None) -> (out, residual_out)
        h = x + residual (or x); out = weight * norm(h); residual_out = h
        x and residual are CONSUMED: the CUDA path overwrites them in place (out is x's
        storage, residual_out residual's); callers use only the returned tensors.
    rope_and_cache(q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping)
        -> (q_rot, k_rot); k_rot and v written to the caches at slot_mapping (-1 skipped).
        q and k are consumed likewise (rotated in place on CUDA).
    silu_and_mul(gate_up) -> silu(gate_up[:, :I]) * gate_up[:, I:]   (new tensor)

Shapes: x [num_tokens, hidden]; q [num_tokens, num_heads, head_dim]; k, v [num_tokens,
num_kv_heads, head_dim]; cos/sin tables float32 [max_positions, head_dim]; positions
[num_tokens] int64; gate_up [num_tokens, 2 * intermediate].
"""

from __future__ import annotations

import torch

from cuda_kernels import reference


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual
    dtype = h.dtype
    f = h.to(torch.float32)
    f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    return weight * f.to(dtype), h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k at ``positions`` (new tensors)."""
    cos = cos_table[positions].to(q.dtype).unsqueeze(1)  # [num_tokens, 1, head_dim]
    sin = sin_table[positions].to(q.dtype).unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = apply_rope(q, k, cos_table, sin_table, positions)
    reference.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
