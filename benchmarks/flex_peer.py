"""torch FlexAttention over the paged KV cache: the decode peer of kernels_bench.

The flash-layout cache ``[num_blocks, block_size, num_kv_heads, head_dim]`` is viewed, without
a copy, as ONE key/value sequence of every slot ``[1, num_kv_heads, num_slots, head_dim]``;
each decode query (one per sequence, the batch dimension) gets a BlockMask whose KV blocks
are its block table (KV block size = block_size), so FlexAttention reads only the sequence's
own pages, as torch's experimental paged-attention helper does. A mask_mod hides the slots
past seq_len in the last page and any slot of another sequence (slot -> owner and logical
position tables, built once).

``make_flex_paged_decode(...)`` returns a zero-argument callable producing
``[num_seqs, num_heads, head_dim]``, or raises with FlexAttention's own error when this torch
cannot build or compile it (kernels_bench records the message).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def make_flex_paged_decode(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    compile: bool = True,
) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    num_seqs, _, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_slots = num_blocks * block_size
    dev = q.device
    k = k_cache.view(1, num_slots, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.view(1, num_slots, num_kv_heads, head_dim).transpose(1, 2)
    k, v = k.expand(num_seqs, -1, -1, -1), v.expand(num_seqs, -1, -1, -1)
    tables = block_tables.long()
    slots = tables[:, :, None] * block_size + torch.arange(block_size, device=dev)
    slot_pos = torch.full((num_slots,), 1 << 30, dtype=torch.int32, device=dev)
    logical = torch.arange(slots[0].numel(), dtype=torch.int32, device=dev)
    slot_pos[slots.flatten()] = logical.repeat(num_seqs)
    slot_owner = torch.full((num_slots,), -1, dtype=torch.int32, device=dev)
    owners = torch.arange(num_seqs, dtype=torch.int32, device=dev)
    slot_owner[slots.flatten()] = owners.repeat_interleave(slots[0].numel())
    lens = seq_lens.to(torch.int32)

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return (slot_owner[kv_idx] == b) & (slot_pos[kv_idx] < lens[b])

    kv_num_blocks = (-(-lens // block_size)).view(num_seqs, 1, 1)
    # NOTE: BlockMask sizes its dense view by kv_indices' last dim, so it must span every
    # physical block (the valid entries first, kv_num_blocks of them).
    kv_indices = torch.zeros((num_seqs, 1, 1, num_blocks), dtype=torch.int32, device=dev)
    kv_indices[:, 0, 0, : block_tables.shape[1]] = block_tables.to(torch.int32)
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        BLOCK_SIZE=(128, block_size),
        mask_mod=mask_mod,
        seq_lengths=(1, num_slots),
    )
    # NOTE: uncompiled flex materialises the scores (the CPU test's path); compiled is the peer.
    compiled = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    q4 = q.unsqueeze(2)  # [num_seqs, num_heads, 1, head_dim]

    def run() -> torch.Tensor:
        out = compiled(q4, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
        return out.squeeze(2)  # type: ignore[union-attr]

    return run
