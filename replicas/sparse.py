"""Opt-in sparse decode attention for the engine (TinyServe's query-aware page selection).

``attach_sparse_attention(model, config, num_blocks, block_size)`` gives every layer from
``config.dense_layers`` on a SparseLayer: the layer's page metadata (per block and KV head,
element-wise key min / max, cuda_kernels.sparse_reference) plus the decode hook that
replicas.attention calls. Prefill, the first ``dense_layers`` layers and any decode batch
whose block_tables cover at most ``token_budget`` tokens stay dense (the result would be the
same; the scoring would only cost time).

Memory: ``2 * num_kv_heads * head_dim`` values per block and sparse layer, i.e.
1/block_size of the layer's K+V (6.25% at block_size 16); metadata_bytes_per_block() says.

Compaction / block copies: the metadata tensors have the block dim first; pass
``SparseAttention.metadata_tensors()`` in the ``kv_caches`` list of
``KVCacheManager.apply_compaction`` / ``ops.copy_blocks`` so they move with the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cuda_kernels import ops
from replicas.config import SparseAttentionConfig
from replicas.model import CausalLM


@dataclass(frozen=True, slots=True)
class SparseAttentionStats:
    """Totals since start, summed over sparse layers and KV heads (pages = blocks)."""

    num_sparse_decode_calls_total: int
    num_pages_scored_total: int
    num_pages_selected_total: int

    @property
    def selected_fraction(self) -> float:
        return self.num_pages_selected_total / max(self.num_pages_scored_total, 1)


class SparseAttention:
    """Owns the page metadata of every sparse layer and the shared counters."""

    def __init__(
        self,
        config: SparseAttentionConfig,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if config.token_budget < 2 * block_size:
            raise ValueError(
                f"sparse_attention.token_budget {config.token_budget} must cover at least two "
                f"blocks of {block_size} tokens (the first and the current page are always kept)"
            )
        self.config = config
        self.block_size = block_size
        shape = (num_blocks, num_kv_heads, head_dim)
        self.layers: dict[int, SparseLayer] = {
            i: SparseLayer(
                self,
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for i in range(config.dense_layers, num_layers)
        }
        self.num_kv_heads = num_kv_heads
        # NOTE: counted on the host from the step's seq_lens (count_step): device counters
        # cost ~10 tiny launches per layer, as much as the metadata refresh itself.
        self._calls = self._scored = self._selected = 0

    def metadata_tensors(self) -> list[torch.Tensor]:
        """Every metadata tensor (block dim first): add them to compaction's kv_caches."""
        return [t for layer in self.layers.values() for t in (layer.k_min, layer.k_max)]

    def metadata_bytes_per_block(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.metadata_tensors())

    def is_sparse(self, max_blocks: int) -> bool:
        """The rule SparseLayer.decode applies: block_tables wider than the budget."""
        return max_blocks * self.block_size > self.config.token_budget

    def count_step(self, seq_lens: Sequence[int], max_blocks: int) -> None:
        """Record one decode batch (host ints; the engine knows them without a sync)."""
        if not seq_lens or not self.is_sparse(max_blocks):
            return
        bs, k = self.block_size, self.config.token_budget // self.block_size
        pages = [-(-n // bs) for n in seq_lens]
        per_layer = len(self.layers) * self.num_kv_heads
        self._calls += len(self.layers)
        self._scored += sum(pages) * per_layer
        self._selected += sum(min(p, k) for p in pages) * per_layer

    def stats(self) -> SparseAttentionStats:
        return SparseAttentionStats(self._calls, self._scored, self._selected)


class SparseLayer:
    """One layer's metadata and decode hook (called by replicas.attention.PagedAttention)."""

    def __init__(self, owner: SparseAttention, k_min: torch.Tensor, k_max: torch.Tensor) -> None:
        self.owner = owner
        self.k_min = k_min  # [num_blocks, num_kv_heads, head_dim]
        self.k_max = k_max

    def on_cache_write(
        self, key: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Fold the keys just written at slot_mapping (into k_cache) into the page metadata."""
        bs = self.owner.block_size
        ops.update_page_minmax(key, self.k_min, self.k_max, slot_mapping, bs, k_cache)

    def decode(
        self,
        query: torch.Tensor,  # [num_decode_seqs, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor | None:
        """Sparse decode output, or None when the batch fits the budget (take the dense path)."""
        owner = self.owner
        budget = owner.config.token_budget
        if not owner.is_sparse(block_tables.shape[1]):
            return None
        out, _ = ops.sparse_paged_decode_attention(
            query, k_cache, v_cache, self.k_min, self.k_max, block_tables, seq_lens, scale, budget
        )
        return out


def attach_sparse_attention(
    model: CausalLM, config: SparseAttentionConfig, num_blocks: int, block_size: int
) -> SparseAttention:
    """Allocate the metadata and hook every sparse layer of ``model`` (mutates the model's
    attention modules; returns the owner, whose stats()/metadata_tensors() the engine uses)."""
    cfg = model.config
    param = next(model.parameters())
    sparse = SparseAttention(
        config,
        cfg.num_hidden_layers,
        num_blocks,
        block_size,
        cfg.num_kv_heads,
        cfg.head_dim,
        param.dtype,
        param.device,
    )
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.sparse = sparse.layers.get(i)
    return sparse
