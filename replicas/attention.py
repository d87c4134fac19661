"""Paged self-attention layer: projections + RoPE here, the attention itself in cuda_kernels.

The engine packs one step's tokens as ``[decode tokens | prefill tokens]``::

    rows        0 .. num_decode_tokens-1          num_decode_tokens .. num_tokens-1
    meaning     one new token per decode seq      new chunk of each prefill seq (concatenated)
    kernel      ops.paged_decode_attention        ops.paged_prefill_attention

Every row's new K/V is written into the layer's cache first (``ops.rope_and_cache`` rotates
q and k and writes k, v at ``slot_mapping``), then both kernels read context through
``block_tables``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from cuda_kernels import ops
from replicas.layers import RotaryEmbedding
from replicas.model_config import ModelArchConfig

if TYPE_CHECKING:
    from replicas.sparse import SparseLayer


@dataclass(slots=True)
class AttentionMetadata:
    """Integer tensors describing one step's batch (on the model's device, except
    ``prefill_cu_seqlens_q`` / ``prefill_seq_lens``: host tensors, read on the host).

    decode sequences come first: ``decode_*`` have ``num_decode_tokens`` rows; ``prefill_*``
    describe the remaining rows. ``slot_mapping`` covers all ``num_tokens`` rows.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decode_seqs, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decode_seqs] int32
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefill_seqs + 1] int32
    prefill_seq_lens: torch.Tensor  # [num_prefill_seqs] int32
    prefill_block_tables: torch.Tensor  # [num_prefill_seqs, max_blocks] int32
    num_prefill_tokens: int
    # Row ranges [start, end) splitting the decode rows into separate kernel calls; None =
    # one call. NOTE: set on CPU only, where the torch reference pads every sequence of a
    # call to the call's longest context; grouping similar lengths cuts that padding.
    decode_groups: list[tuple[int, int]] | None = None


class PagedAttention(nn.Module):
    """GQA self-attention with fused q/k/v projection and a paged KV cache.

    ``qkv_proj.weight`` rows: ``[q (num_heads*head_dim) | k (num_kv*head_dim) | v (same)]``.
    """

    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.q_size
        self.kv_size = cfg.kv_size
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        # NOTE: set by replicas.sparse.attach_sparse_attention; None = dense decode.
        self.sparse: SparseLayer | None = None

    def forward(
        self,
        rotary: RotaryEmbedding,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """hidden ``[num_tokens, hidden]`` -> ``[num_tokens, hidden]``; writes K/V to caches.
        positions ``[num_tokens]`` int64 index the rotary tables."""
        n = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        # NOTE: q, k, v are views into the qkv output; on CUDA they are rotated in place.
        q, k = ops.rope_and_cache(
            q, k, v, rotary.cos_cached, rotary.sin_cached, positions,
            k_cache, v_cache, meta.slot_mapping,
        )  # fmt: skip
        if self.sparse is not None:
            self.sparse.on_cache_write(k, k_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        outs: list[torch.Tensor] = []
        if nd:
            q_dec = q[:nd]  # NOTE: strided view; the decode launcher reads the strides
            bt, lens = meta.decode_block_tables, meta.decode_seq_lens
            dec = None
            if self.sparse is not None:
                dec = self.sparse.decode(q_dec, k_cache, v_cache, bt, lens, self.scale)
            if dec is None:
                groups = meta.decode_groups or [(0, nd)]
                parts = [
                    ops.paged_decode_attention(
                        q_dec[s:e], k_cache, v_cache, bt[s:e], lens[s:e], self.scale
                    )
                    for s, e in groups
                ]
                dec = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            outs.append(dec)
        if meta.num_prefill_tokens:
            outs.append(
                ops.paged_prefill_attention(
                    q[nd:].contiguous(),
                    k_cache,
                    v_cache,
                    meta.prefill_cu_seqlens_q,
                    meta.prefill_seq_lens,
                    meta.prefill_block_tables,
                    self.scale,
                )
            )
        attn = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        out: torch.Tensor = self.o_proj(attn.reshape(n, self.q_size))
        return out
