"""Pure-torch references for every kernel; also the CPU serving path.

Cache layout (flash layout, one K and one V tensor per layer)::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset          (-1 in slot_mapping = padding)

All functions here are vectorised torch (a gather into a dense view, then masked SDPA), so the
engine can serve from them on CPU. On CPU, fp16/bf16 attention is computed in fp32 and cast
back (CPU half matmuls are slow and less accurate); on CUDA the input dtype is kept.

Contracts (shared with cuda_kernels.ops, which dispatches here when no CUDA kernel applies):

- reshape_and_cache mutates k_cache/v_cache in place; returns None.
- paged_decode_attention / paged_prefill_attention return a new tensor shaped like query.
  A decode row with seq_len 0 (a padded batch slot) yields zeros.
- copy_blocks mutates every cache in kv_caches in place with SEQUENTIAL semantics: the result
  equals running ``for s, d in zip(src, dst, strict=True): cache[d] = cache[s]`` in the given order, also
  when the src and dst sets overlap (see resolve_block_copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def _flat_slots(cache: torch.Tensor) -> torch.Tensor:
    """View [num_blocks, block_size, H, D] as [num_blocks * block_size, H, D] (no copy)."""
    if cache.dim() != 4:
        raise ValueError(
            f"cache must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(cache.shape)}"
        )
    try:
        return cache.view(cache.shape[0] * cache.shape[1], cache.shape[2], cache.shape[3])
    except RuntimeError as exc:
        raise ValueError(
            "cache must be viewable as [num_slots, num_kv_heads, head_dim] (in-place writes)"
        ) from exc


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = padding
) -> None:
    """Write key[i]/value[i] into slot slot_mapping[i] of the caches; -1 entries are skipped."""
    k_flat = _flat_slots(k_cache)
    v_flat = _flat_slots(v_cache)
    slots = slot_mapping.to(device=key.device, dtype=torch.long)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    k_flat.index_copy_(0, slots, key.to(k_flat.dtype))
    v_flat.index_copy_(0, slots, value.to(v_flat.dtype))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # NOTE: CPU half/bf16 matmuls are slow and round every partial sum; upcast there only.
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def _gather_context(
    cache: torch.Tensor, block_tables: torch.Tensor, num_ctx_blocks: int
) -> torch.Tensor:
    """[num_seqs, num_ctx_blocks * block_size, num_kv_heads, head_dim] dense copy of the context."""
    # NOTE: unused table entries may hold padding (e.g. -1); clamp so the gather stays in
    # range, the attention mask hides those positions.
    table = block_tables[:, :num_ctx_blocks].to(device=cache.device, dtype=torch.long).clamp_min(0)
    gathered = cache[table]  # [num_seqs, num_ctx_blocks, block_size, H, D]
    s, nb, bs, h, d = gathered.shape
    return gathered.view(s, nb * bs, h, d)


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, tokens of context incl. the current one
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to its first seq_lens[i] cached tokens."""
    num_seqs, num_heads, _ = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    out = torch.zeros_like(query)
    if num_seqs == 0:
        return out
    lens = seq_lens.to(device=query.device, dtype=torch.long)
    max_len = int(lens.max())
    if max_len == 0:
        return out
    nb = -(-max_len // block_size)
    cdt = _compute_dtype(query)
    k = _gather_context(k_cache, block_tables, nb).to(cdt).transpose(1, 2)  # [S, Hkv, L, D]
    v = _gather_context(v_cache, block_tables, nb).to(cdt).transpose(1, 2)
    pos = torch.arange(nb * block_size, device=query.device)
    mask = (pos[None, :] < lens.clamp_min(1)[:, None])[:, None, None, :]  # [S, 1, 1, L]
    q = query.to(cdt).unsqueeze(2)  # [S, H, 1, D]
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv_heads
    )
    o = o.squeeze(2).to(query.dtype)
    return torch.where((lens > 0)[:, None, None], o, out)


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences concatenated
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32, prefix sums of new tokens per seq
    seq_lens: torch.Tensor,  # [num_seqs] int32, total context incl. the new tokens
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new chunk over its cached prefix plus itself.

    The chunk's K/V must already be in the cache (reshape_and_cache first). New token j of
    sequence i sits at position seq_lens[i] - q_len_i + j and sees positions <= its own.
    """
    num_tokens, num_heads, _ = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    cu = [int(x) for x in cu_seqlens_q.tolist()]
    lens = [int(x) for x in seq_lens.tolist()]
    if len(cu) != len(lens) + 1 or cu[-1] != num_tokens:
        raise ValueError("cu_seqlens_q must have num_seqs + 1 entries ending at num_tokens")
    cdt = _compute_dtype(query)
    out = torch.empty_like(query)
    for i, ctx_len in enumerate(lens):
        q_len = cu[i + 1] - cu[i]
        if q_len == 0:
            continue
        if q_len > ctx_len:
            raise ValueError(f"sequence {i}: {q_len} new tokens but seq_len {ctx_len}")
        nb = -(-ctx_len // block_size)
        table = block_tables[i : i + 1]
        k = _gather_context(k_cache, table, nb)[0, :ctx_len].to(cdt).transpose(0, 1)  # [Hkv, L, D]
        v = _gather_context(v_cache, table, nb)[0, :ctx_len].to(cdt).transpose(0, 1)
        q = query[cu[i] : cu[i + 1]].to(cdt).transpose(0, 1)  # [H, q_len, D]
        o = _causal_sdpa(q, k, v, scale)
        out[cu[i] : cu[i + 1]] = o.transpose(0, 1).to(query.dtype)
    return out


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [H, q_len, D] over k/v [Hkv, L, D], bottom-right causal (q_len <= L) -> [H, q_len, D]."""
    num_heads, q_len = q.shape[0], q.shape[1]
    num_kv_heads, ctx_len = k.shape[0], k.shape[1]
    if q.is_cuda:
        # NOTE: on CUDA, expand K/V heads and pass a CausalBias so SDPA can pick its flash /
        # memory-efficient kernels; a boolean mask with enable_gqa falls back to the slow math
        # path (measured ~4 TFLOP/s on an H200 before this change).
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=0)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=0)
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if q_len == ctx_len:
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)[0]
        bias = causal_lower_right(q_len, ctx_len)
        return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias, scale=scale)[0]
    gqa = num_heads != num_kv_heads
    if q_len == ctx_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
    mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, L]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def resolve_block_copies(src: list[int], dst: list[int]) -> tuple[list[int], list[int]]:
    """Turn an ordered list of block moves into one equivalent parallel gather.

    Returns (src_ids, dst_ids) such that ``cache[dst_ids] = cache_before[src_ids]`` (all reads
    from the state BEFORE any write) equals applying the pairs one by one in order. Each
    dst_id appears once; self-copies vanish. Raises ValueError on mismatched lengths.
    """
    if len(src) != len(dst):
        raise ValueError(f"src has {len(src)} entries, dst {len(dst)}")
    origin: dict[int, int] = {}  # block_id -> block whose ORIGINAL content it holds now
    for s, d in zip(src, dst, strict=True):
        origin[d] = origin.get(s, s)
    pairs = [(o, d) for d, o in origin.items() if o != d]
    return [o for o, _ in pairs], [d for _, d in pairs]


def copy_blocks(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks in every cache (dim 0 = block_id), sequential semantics (module doc)."""
    if not kv_caches:
        return
    src_ids, dst_ids = resolve_block_copies(
        [int(x) for x in src.tolist()], [int(x) for x in dst.tolist()]
    )
    if not src_ids:
        return
    device = kv_caches[0].device
    s = torch.tensor(src_ids, dtype=torch.long, device=device)
    d = torch.tensor(dst_ids, dtype=torch.long, device=device)
    for cache in kv_caches:
        # NOTE: cache[s] materialises every source before any write: overlap-safe.
        cache.index_copy_(0, d, cache[s])
