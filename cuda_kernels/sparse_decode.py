"""Sparse paged decode on CUDA: Quest page scores (page_score.cu) + top-k selection (torch)
+ the dense tensor-core decode kernel over per-(seq, KV head) compacted block tables.

Two-phase design (contract and layouts: cuda_kernels.sparse_reference)::

    phase 1  page_score_kernel      query, k_min/k_max, block_tables -> scores [S, Hkv, P]
             page_select_kernel     radix top-k + ordered compaction -> virtual block_tables
                                    [S*Hkv, k] (select="torch": topk + sort + gather instead)
    phase 2  paged_decode_mma_kernel (unchanged) on the cache seen as ONE KV head:
             query [S*Hkv, group, D], "block" b*block_size*Hkv + h, block stride D elements,
             slot stride Hkv*D elements (cache_block_stride / cache_slot_stride arguments)

NOTE: phase 2 reuses the dense kernel as is, so sparse and dense attention share one tuned
inner loop and differ only in which tokens they read. Reads nothing on the host (CUDA-graph
capturable); the output equals the reference to bf16/fp16 rounding, given equal selections.
"""

from __future__ import annotations

import math

import torch

from cuda_kernels import runtime, sparse_reference
from cuda_kernels.checks import require
from cuda_kernels.decode import _MMA_STAGES, _NUM_WARPS, _TAGS, _check, _choose_partition
from cuda_kernels.sparse_reference import PageSelection

_SCORE_WARPS, _PAGES_PER_WARP, _MAX_GROUP = 4, 8, 16  # NOTE: match page_score.cu
_SCORE_THREADS, _SELECT_THREADS = 128, 256  # NOTE: match page_score.cu / page_select.cu
# NOTE: the page score kernel used by default; benchmarks/sparse_bench.py times both.
SCORE_VARIANT = "thread"  # NOTE: 69 vs 85 us at 32k x 16 on an H100 (sparse_h100.json)


def check_page_meta(k_cache: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor) -> None:
    nb, _, hkv, d = k_cache.shape
    for name, t in (("k_min", k_min), ("k_max", k_max)):
        require(
            t.shape == (nb, hkv, d) and t.dtype == k_cache.dtype and t.is_contiguous(),
            f"{name} must be contiguous [num_blocks, num_kv_heads, head_dim] {k_cache.dtype},"
            f" got {tuple(t.shape)} {t.dtype}",
        )
        require(t.device == k_cache.device, f"{name} must be on the cache's device")


def update_page_minmax(
    k_min: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim]
    k_max: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], keys written
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, -1 = padding
) -> None:
    """CUDA sparse_reference.update_page_minmax (page_meta.cu; one launch, no atomics).
    Reads the keys from k_cache, so call it after reshape_and_cache. Mutates k_min/k_max."""
    check_page_meta(k_cache, k_min, k_max)
    require(k_cache.dtype in _TAGS, f"page metadata kernel supports fp16/bf16, got {k_cache.dtype}")
    require(slot_mapping.dim() == 1 and slot_mapping.dtype in (torch.int32, torch.int64),
            "slot_mapping must be int32/int64 [num_tokens]")  # fmt: skip
    require(slot_mapping.device == k_cache.device, "slot_mapping must be on the cache's device")
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    idx = "int" if slot_mapping.dtype == torch.int32 else "long long"
    expr = f"page_minmax_kernel<{_TAGS[k_cache.dtype]}, {idx}>"
    kernel = runtime.get_kernel("page_meta.cu", expr, k_cache.device)
    row_words = k_cache.shape[2] * k_cache.shape[3] // 2
    args = (
        runtime.ptr(k_min), runtime.ptr(k_max), runtime.ptr(k_cache), runtime.ptr(slot_mapping),
        runtime.i32(num_tokens), runtime.i32(row_words), runtime.i32(k_cache.shape[1]),
    )  # fmt: skip
    runtime.launch(kernel, (num_tokens, 1, 1), (128, 1, 1), args, k_cache.device)


def page_scores(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_min: torch.Tensor,  # [num_blocks, num_kv_heads, head_dim]
    k_max: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_size: int,
    variant: str | None = None,
) -> torch.Tensor:
    """CUDA sparse_reference.page_scores: float32 [num_seqs, num_kv_heads, max_blocks].
    variant: "warp" (a warp per page) or "thread" (a thread per page); None = SCORE_VARIANT."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_min.shape[1]
    group = num_heads // num_kv_heads
    require(group <= _MAX_GROUP, f"page scores support <= {_MAX_GROUP} query heads per KV head")
    max_blocks = block_tables.shape[1]
    scores = torch.empty(
        (num_seqs, num_kv_heads, max_blocks), dtype=torch.float32, device=query.device
    )
    if num_seqs == 0 or max_blocks == 0:
        return scores
    query = query.contiguous()
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    variant = variant or SCORE_VARIANT
    require(variant in ("warp", "thread"), f"unknown page score variant {variant!r}")
    name = "page_score_kernel" if variant == "warp" else "page_score_thread_kernel"
    expr = f"{name}<{_TAGS[query.dtype]}, {head_dim}>"
    kernel = runtime.get_kernel("page_score.cu", expr, query.device)
    per_cta = _SCORE_WARPS * _PAGES_PER_WARP if variant == "warp" else _SCORE_THREADS
    grid = (math.ceil(max_blocks / per_cta), num_kv_heads, num_seqs)
    args = (
        runtime.ptr(scores), runtime.ptr(query), runtime.ptr(k_min), runtime.ptr(k_max),
        runtime.ptr(block_tables), runtime.ptr(seq_lens), runtime.i64(query.stride(0)),
        runtime.i32(max_blocks), runtime.i32(num_kv_heads), runtime.i32(group),
        runtime.i32(block_size),
    )  # fmt: skip
    threads = _SCORE_WARPS * 32 if variant == "warp" else _SCORE_THREADS
    runtime.launch(kernel, grid, (threads, 1, 1), args, query.device)
    return scores


def select_pages(
    scores: torch.Tensor,  # [num_seqs, num_kv_heads, max_blocks] float32 (forced)
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_size: int,
    budget_pages: int,
) -> PageSelection:
    """CUDA sparse_reference.select_pages (one CTA per row). Same pages and seq_lens; ties
    at the k-th score go to the lower page index; unused page_ids hold max_blocks."""
    num_seqs, num_kv_heads, max_blocks = scores.shape
    k = min(budget_pages, max_blocks)
    rows = num_seqs * num_kv_heads
    dev = scores.device
    page_ids = torch.empty((rows, k), dtype=torch.long, device=dev)
    vtable = torch.empty((rows, k), dtype=torch.int32, device=dev)
    lens = torch.empty((rows,), dtype=torch.int32, device=dev)
    if rows == 0 or k == 0:
        return PageSelection(page_ids, vtable, lens.zero_())
    scores, block_tables = scores.contiguous(), block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    kernel = runtime.get_kernel("page_select.cu", "page_select_kernel", dev)
    args = (
        runtime.ptr(page_ids), runtime.ptr(vtable), runtime.ptr(lens), runtime.ptr(scores),
        runtime.ptr(block_tables), runtime.ptr(seq_lens), runtime.i32(max_blocks),
        runtime.i32(num_kv_heads), runtime.i32(block_size), runtime.i32(k),
    )  # fmt: skip
    runtime.launch(kernel, (rows, 1, 1), (_SELECT_THREADS, 1, 1), args, dev)
    return PageSelection(page_ids, vtable, lens)


def decode_selected(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sel: PageSelection,
    scale: float,
) -> torch.Tensor:
    """Phase 2: exact attention over the selected pages -> [num_seqs, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    rows = num_seqs * num_kv_heads
    q = query.contiguous().view(rows, group, head_dim)  # [S*Hkv, group, D]
    out = torch.empty_like(q)
    max_len = sel.block_tables.shape[1] * block_size
    if rows == 0 or max_len == 0:
        return out.zero_().view(num_seqs, num_heads, head_dim)
    hg = max(h for h in range(1, 17) if group % h == 0)
    device = query.device
    part = _choose_partition(rows * group // hg, max_len, runtime.num_sms(device.index or 0))
    max_splits = math.ceil(max_len / part)
    part_out = torch.empty((rows, group, max_splits, head_dim), dtype=torch.float32, device=device)
    part_ml = torch.empty((rows, group, max_splits, 2), dtype=torch.float32, device=device)
    tag = _TAGS[query.dtype]
    bt, lens = sel.block_tables.contiguous(), sel.seq_lens.contiguous()
    expr = f"paged_decode_mma_kernel<{tag}, {head_dim}, {block_size}, {_MMA_STAGES}>"
    reduce_expr = f"paged_decode_reduce_kernel<{tag}, {head_dim}>"
    sources = ("paged_decode.cu", "paged_decode_mma.cu")
    split_k = runtime.get_kernel(sources, expr, device, (reduce_expr,))
    reduce_k = runtime.get_kernel(sources, reduce_expr, device, (expr,))
    smem = _MMA_STAGES * _NUM_WARPS * 2 * 16 * head_dim * query.element_size()
    runtime.allow_dynamic_smem(split_k, smem)
    args1 = (
        runtime.ptr(part_out), runtime.ptr(part_ml), runtime.ptr(q), runtime.ptr(k_cache),
        runtime.ptr(v_cache), runtime.ptr(bt), runtime.ptr(lens),
        runtime.i64(q.stride(0)), runtime.i64(q.stride(1)),
        runtime.i64(head_dim), runtime.i64(num_kv_heads * head_dim),  # NOTE: virtual strides
        runtime.i32(bt.shape[1]), runtime.i32(group), runtime.i32(group),
        runtime.i32(max_splits), runtime.i32(part), runtime.f32(scale * math.log2(math.e)),
        runtime.i32(hg),
    )  # fmt: skip
    runtime.launch(split_k, (group // hg, rows, max_splits), (_NUM_WARPS * 32, 1, 1), args1,
                   device, smem)  # fmt: skip
    args2 = (runtime.ptr(out), runtime.ptr(part_out), runtime.ptr(part_ml), runtime.ptr(lens),
             runtime.i32(group), runtime.i32(max_splits), runtime.i32(part), runtime.i32(max_len))  # fmt: skip
    runtime.launch(reduce_k, (group, rows, 1), (head_dim, 1, 1), args2, device)
    return out.view(num_seqs, num_heads, head_dim)


def sparse_paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    token_budget: int,
    select: str = "kernel",
) -> tuple[torch.Tensor, PageSelection]:
    """CUDA sparse_reference.sparse_paged_decode_attention (checks, then both phases).
    select: "kernel" (page_select.cu) or "torch" (the reference's topk path, for benchmarks)."""
    _check(query, k_cache, v_cache, block_tables, seq_lens)
    check_page_meta(k_cache, k_min, k_max)
    block_size = k_cache.shape[1]
    require(token_budget >= 2 * block_size, "token_budget must cover >= 2 blocks")
    scores = page_scores(query, k_min, k_max, block_tables, seq_lens, block_size)
    require(select in ("kernel", "torch"), f"unknown select variant {select!r}")
    chooser = select_pages if select == "kernel" else sparse_reference.select_pages
    sel = chooser(scores, block_tables, seq_lens, block_size, token_budget // block_size)
    return decode_selected(query, k_cache, v_cache, sel, scale), sel
