"""Building blocks of Llama-family decoders: RMSNorm, rotary embedding, SwiGLU MLP.

All modules take FLAT token batches (``[num_tokens, ...]``): the engine packs every scheduled
request's new tokens into one row list, so there is no batch/padding dimension anywhere.

NOTE: the arithmetic follows Hugging Face transformers step by step (norm in float32, cos/sin
from a float32 outer product, ``rotate_half`` layout) so greedy decoding is token-identical.
The elementwise work runs through cuda_kernels.ops: fused CUDA kernels on a GPU (RMSNorm with
the residual add, RoPE with the cache write, SiLU-and-mul), their torch references on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cuda_kernels import ops
from replicas.model_config import RopeConfig


class RMSNorm(nn.Module):
    """``weight * h / sqrt(mean(h²) + eps)`` of ``h = x + residual`` (or x), in float32, cast
    back to x's dtype. Returns ``(normed, h)``: h is the next residual. NOTE: x and residual
    are consumed (the CUDA kernel overwrites them in place)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with llama3 / linear scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    # NOTE: Llama 3.1 scaling: long wavelengths are divided by `factor`, short ones kept,
    # the band in between interpolated smoothly.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """RoPE tables for absolute positions (applied by ``ops.rope_and_cache``).

    The cos/sin table ``[max_positions, head_dim]`` is built once (float32) and cast to the
    activation dtype on use, per row, inside the kernel (or its reference).
    """

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.rope = rope
        self.cos_cached: torch.Tensor
        self.sin_cached: torch.Tensor
        self.register_buffer("cos_cached", torch.empty(0), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0), persistent=False)
        if not self.cos_cached.is_meta:
            self.build(self.cos_cached.device)

    def build(self, device: torch.device) -> None:
        """(Re)compute the float32 cos/sin tables on ``device`` (after meta init or a cast)."""
        inv_freq = rope_inv_freq(self.rope, self.head_dim)
        t = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos_cached = emb.cos().to(device)
        self.sin_cached = emb.sin().to(device)


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul.

    ``gate_up_proj.weight`` is ``[2 * intermediate, hidden]``: rows ``[0, I)`` are the
    checkpoint's ``gate_proj``, rows ``[I, 2I)`` its ``up_proj`` (see replicas.weights).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))
        return out
