"""Building blocks of Llama-family decoders: RMSNorm, rotary embedding, SwiGLU MLP.

All modules take FLAT token batches (``[num_tokens, ...]``): the engine packs every scheduled
request's new tokens into one row list, so there is no batch/padding dimension anywhere.

NOTE: the arithmetic follows Hugging Face transformers step by step (norm in float32, cos/sin
from a float32 outer product, ``rotate_half`` layout) so greedy decoding is token-identical.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from replicas.model_config import RopeConfig

# (cos, sin), each [num_tokens, 1, head_dim]
RopeTables = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, computed in float32, cast back to x's dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


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
    """RoPE tables for absolute positions (apply them with ``apply_rope``).

    The cos/sin table ``[max_positions, head_dim]`` is built once (float32) and cast to the
    activation dtype on use.
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

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """cos/sin rows of ``positions`` ``[num_tokens]``, shaped ``[num_tokens, 1, head_dim]``
        to broadcast over heads. NOTE: gathered once per step and shared by every layer."""
        cos = self.cos_cached[positions].to(dtype).unsqueeze(1)
        sin = self.sin_cached[positions].to(dtype).unsqueeze(1)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    rope: RopeTables, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[num_tokens, num_heads, head_dim]`` and k ``[num_tokens, num_kv_heads,
    head_dim]`` with the tables from ``RotaryEmbedding.cos_sin``; returns new tensors."""
    cos, sin = rope
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


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
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        out: torch.Tensor = self.down_proj(nn.functional.silu(gate) * up)
        return out
