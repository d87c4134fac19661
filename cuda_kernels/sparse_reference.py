"""Query-aware page selection (Quest-style sparse paged decode): torch reference and CPU path.

Page metadata, one pair per layer, block dim first so compaction / block copies move it like
the caches (pass both tensors in the ``kv_caches`` list of copy_blocks/apply_compaction)::

    k_min, k_max   [num_blocks, num_kv_heads, head_dim]   cache dtype
                   element-wise min / max over the keys written into the block so far

Decode step, per sequence s and KV head h (Quest, Tang et al., ICML 2024, Alg. 1)::

    bound(page, head) = sum_d max(q_d * k_min_d, q_d * k_max_d)   >= q . k for every key k
    score[s, h, p]    = max over the group's query heads of bound    (GQA, see NOTE below)
    selected pages    = top (token_budget // block_size) pages of score[s, h, :], always
                        including page 0 and the last (partially filled) page
    attention         = exact softmax attention over the selected pages only

Contracts:

- update_page_minmax mutates k_min/k_max in place. A write at block offset 0 RESETS the
  block's metadata first (the block was just (re)allocated); later offsets fold in. This is
  exact as long as a block is filled from offset 0 upward, which the pool guarantees (only
  full blocks are shared; chunked prefill continues mid-block after earlier offsets).
- page_scores returns float32 [num_seqs, num_kv_heads, max_blocks]: +inf for the forced
  pages, -inf past the sequence's last page.
- select_pages returns a PageSelection describing, for every (seq, KV head) row, a compacted
  "virtual" block table over the cache seen as one KV head (see _virtual_cache); its
  seq_lens count only selected tokens. Same result on every device; no host reads.
- sparse_paged_decode_attention returns [num_seqs, num_heads, head_dim] like query. With
  token_budget >= the context it equals dense paged_decode_attention (all pages selected).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from cuda_kernels import reference


class PageSelection(NamedTuple):
    """Selected pages of one decode batch; rows are (seq, kv_head) pairs, seq-major."""

    page_ids: torch.Tensor  # [num_seqs * num_kv_heads, k] int64, ascending logical page index
    block_tables: torch.Tensor  # [num_seqs * num_kv_heads, k] int32, virtual block ids
    seq_lens: torch.Tensor  # [num_seqs * num_kv_heads] int32, selected tokens per row


def update_page_minmax(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_min: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim]
    k_max: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = padding
    block_size: int,
) -> None:
    """Fold freshly written keys into their blocks' min/max (module contract). Mutates
    k_min/k_max. Vectorised and sync-free (CUDA-graph capturable on CUDA)."""
    if key.shape[0] == 0:
        return
    slots = slot_mapping.to(device=key.device, dtype=torch.long)
    pad = slots < 0
    blocks = torch.where(pad, 0, slots // block_size)
    first = (slots % block_size == 0) & ~pad
    # NOTE: reset every block that receives an offset-0 write, before folding in: a flag per
    # block (scatter amax) so duplicate indices below all write the same value.
    flag = torch.zeros(k_min.shape[0], dtype=torch.int8, device=key.device)
    flag.scatter_reduce_(0, blocks, first.to(torch.int8), reduce="amax")
    reset = flag[blocks].bool()[:, None, None]
    # NOTE: torch.full, not torch.tensor: no host-to-device copy (CUDA-graph capture).
    inf = torch.full((), float("inf"), dtype=k_min.dtype, device=key.device)
    k_min[blocks] = torch.where(reset, inf, k_min[blocks])
    k_max[blocks] = torch.where(reset, -inf, k_max[blocks])
    # NOTE: padded tokens fold +inf / -inf into block 0: a no-op for amin / amax.
    kk = key.to(k_min.dtype)
    idx = blocks[:, None, None].expand_as(kk)
    k_min.scatter_reduce_(0, idx, torch.where(pad[:, None, None], inf, kk), reduce="amin")
    k_max.scatter_reduce_(0, idx, torch.where(pad[:, None, None], -inf, kk), reduce="amax")


def force_pages(
    scores: torch.Tensor,  # [num_seqs, num_kv_heads, max_blocks] float32
    seq_lens: torch.Tensor,  # [num_seqs]
    block_size: int,
) -> torch.Tensor:
    """Scores with page 0 and the last page set to +inf and pages past the end to -inf."""
    num_pages = (seq_lens.to(device=scores.device, dtype=torch.long) + block_size - 1) // block_size
    p = torch.arange(scores.shape[2], device=scores.device)[None, None, :]
    n = num_pages[:, None, None]
    forced = (p == 0) | (p == n - 1)
    out = torch.where(forced, float("inf"), scores)
    return torch.where(p >= n, float("-inf"), out)


def page_scores(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_size: int,
) -> torch.Tensor:
    """Quest upper bound per (seq, KV head, logical page); float32 [S, Hkv, max_blocks]."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_min.shape[1]
    group = num_heads // num_kv_heads
    table = block_tables.to(device=query.device, dtype=torch.long).clamp_min(0)
    lo = k_min[table].float()  # [S, P, Hkv, D]
    hi = k_max[table].float()
    q = query.float().view(num_seqs, 1, num_kv_heads, group, head_dim)
    bound = torch.maximum(q * lo[:, :, :, None], q * hi[:, :, :, None]).sum(-1)  # [S,P,Hkv,G]
    # NOTE (GQA): the group shares one KV page, so a page is kept if ANY of its query heads
    # may need it: max over the group's bounds (a mean would let heads that attend broadly
    # outvote one head that retrieves a single needle).
    scores = bound.amax(-1).transpose(1, 2).contiguous()  # [S, Hkv, P]
    return force_pages(scores, seq_lens, block_size)


def select_pages(
    scores: torch.Tensor,  # [num_seqs, num_kv_heads, max_blocks] float32 (forced)
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_size: int,
    budget_pages: int,
) -> PageSelection:
    """Top-budget_pages pages per (seq, KV head), ascending, as virtual block tables."""
    num_seqs, num_kv_heads, max_blocks = scores.shape
    k = min(budget_pages, max_blocks)
    flat = scores.view(num_seqs * num_kv_heads, max_blocks)
    # NOTE: sorted ascending, so the forced last page (highest valid index) ends the row and
    # pages past the end (-inf, picked only when the sequence has < k pages) come after it.
    pages = flat.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # [S*Hkv, k]
    # NOTE: expand, not repeat_interleave: no output-size sync (CUDA-graph capture).
    bt = block_tables.to(device=scores.device, dtype=torch.long)[:, None, :]
    bt = bt.expand(num_seqs, num_kv_heads, max_blocks).reshape(num_seqs * num_kv_heads, -1)
    blocks = bt.gather(1, pages).clamp_min(0)
    head = torch.arange(num_kv_heads, device=scores.device).repeat(num_seqs)[:, None]
    # NOTE: virtual block id of (block b, head h) in the one-head view of the cache.
    vtable = (blocks * (block_size * num_kv_heads) + head).to(torch.int32)
    lens = seq_lens.to(device=scores.device, dtype=torch.long)[:, None]
    lens = lens.expand(num_seqs, num_kv_heads).reshape(-1)
    num_pages = (lens + block_size - 1) // block_size
    sel = torch.clamp(torch.minimum(num_pages, torch.full_like(num_pages, k)) * block_size
                      - (num_pages * block_size - lens), min=0)  # fmt: skip
    return PageSelection(pages, vtable, sel.to(torch.int32))


def virtual_cache(cache: torch.Tensor) -> torch.Tensor:
    """View [num_blocks, block_size, Hkv, D] as [V, block_size, 1, D] where virtual block
    ``b * block_size * Hkv + h`` is KV head h of block b (overlapping strides; read-only)."""
    nb, bs, hkv, d = cache.shape
    size = ((nb - 1) * bs * hkv + hkv, bs, 1, d)
    return cache.as_strided(size, (d, hkv * d, d, 1), cache.storage_offset())


def sparse_paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    token_budget: int,
) -> tuple[torch.Tensor, PageSelection]:
    """Score, select and attend (module contract); returns (output, selection)."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    scores = page_scores(query, k_min, k_max, block_tables, seq_lens, block_size)
    sel = select_pages(scores, block_tables, seq_lens, block_size, token_budget // block_size)
    q = query.reshape(num_seqs * num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = reference.paged_decode_attention(
        q, virtual_cache(k_cache), virtual_cache(v_cache), sel.block_tables, sel.seq_lens, scale
    )
    return out.view(num_seqs, num_heads, head_dim), sel
