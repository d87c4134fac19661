"""Llama-family causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Parameter names follow the Hugging Face checkpoints except for two fusions
(``self_attn.qkv_proj`` and ``mlp.gate_up_proj``), which replicas.weights fills from the
separate checkpoint tensors. ``lm_head`` is tied to ``embed_tokens`` when the config says so.

NOTE: Mistral's sliding window is not implemented in attention; the engine caps
max_model_len at the window instead, where full and sliding attention coincide.
"""

from __future__ import annotations

import torch
from torch import nn

from replicas.attention import AttentionMetadata, PagedAttention
from replicas.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP
from replicas.model_config import ModelArchConfig


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))`` (HF order of operations).

    NOTE: the residual adds are folded into the next norm (vLLM's layout): a layer takes and
    returns ``(hidden, residual)`` with the true hidden state = hidden + residual, so each add
    rides in the fused RMSNorm kernel instead of a kernel of its own.
    """

    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = PagedAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(
        self,
        rotary: RotaryEmbedding,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rotary, positions, hidden, k_cache, v_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """Embeddings, decoder stack and final norm (HF's ``model.*`` namespace)."""

    def __init__(self, cfg: ModelArchConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The full model. ``forward`` runs one engine step's packed tokens."""

    def __init__(self, cfg: ModelArchConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with embed_tokens when tied (again after ``to_empty``, which
        replaces every parameter and so unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids/positions ``[num_tokens]``; kv_caches one (K, V) per layer, each
        ``[num_blocks, block_size, num_kv_heads, head_dim]`` (mutated: new K/V written).
        Returns float32 logits ``[len(logits_indices), vocab_size]`` for the selected rows only
        (NOTE: the LM head over every prefill token would dominate a step's cost)."""
        hidden = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        rotary = self.model.rotary
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches, strict=True):
            hidden, residual = layer(rotary, positions, hidden, residual, k_cache, v_cache, meta)
        assert residual is not None
        hidden, _ = self.model.norm(hidden[logits_indices], residual[logits_indices])
        logits: torch.Tensor = self.lm_head(hidden).float()
        return logits
