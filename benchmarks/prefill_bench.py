"""Prefill attention over a cached prefix (kernels_bench's prefill rows): ops.paged_prefill_attention
against torch SDPA over contiguous K/V, same run, CUDA events, median of reps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from benchmarks.gpu_timing import time_ms
from cuda_kernels import ops, reference

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def bench_prefill(
    num_seqs: int, context: int, chunk: int, iters: int, reps: int
) -> dict[str, float | int]:
    blocks = context // BLOCK_SIZE
    shape = (num_seqs * blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda").to(DTYPE)
    v_cache = torch.randn(shape, device="cuda").to(DTYPE)
    tables = torch.randperm(num_seqs * blocks, device="cuda").to(torch.int32).view(num_seqs, blocks)
    q = torch.randn(num_seqs * chunk, NUM_HEADS, HEAD_DIM, device="cuda").to(DTYPE)
    cu = torch.arange(0, num_seqs + 1, dtype=torch.int32) * chunk  # host tensors: no sync
    lens = torch.full((num_seqs,), context, dtype=torch.int32)
    scale = 1 / math.sqrt(HEAD_DIM)
    k_c = [
        k_cache[tables[i]].view(context, NUM_KV_HEADS, HEAD_DIM).transpose(0, 1).contiguous()
        for i in range(num_seqs)
    ]
    v_c = [
        v_cache[tables[i]].view(context, NUM_KV_HEADS, HEAD_DIM).transpose(0, 1).contiguous()
        for i in range(num_seqs)
    ]
    mask = (
        torch.arange(context, device="cuda")[None, :]
        <= torch.arange(context - chunk, context, device="cuda")[:, None]
    )

    def ours(r: int) -> torch.Tensor:
        return ops.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, scale)

    def sdpa_contig(r: int) -> None:  # the same SDPA call over contiguous K/V: no gather
        for i in range(num_seqs):
            qi = q[i * chunk : (i + 1) * chunk].transpose(0, 1)
            reference._causal_sdpa(qi, k_c[i], v_c[i], scale)

    group = NUM_HEADS // NUM_KV_HEADS
    k_x = [k.repeat_interleave(group, dim=0)[None] for k in k_c]  # expanded before timing
    v_x = [v.repeat_interleave(group, dim=0)[None] for v in v_c]
    bias = causal_lower_right(chunk, context)

    def sdpa_pure(r: int) -> None:  # the SDPA kernel alone: K/V contiguous AND pre-expanded
        for i in range(num_seqs):
            qi = q[i * chunk : (i + 1) * chunk].transpose(0, 1)[None]
            F.scaled_dot_product_attention(qi, k_x[i], v_x[i], attn_mask=bias, scale=scale)

    def sdpa_boolmask(r: int) -> None:  # contiguous K/V, bool mask + enable_gqa (math path)
        for i in range(num_seqs):
            qi = q[i * chunk : (i + 1) * chunk].transpose(0, 1)
            F.scaled_dot_product_attention(
                qi, k_c[i], v_c[i], attn_mask=mask, scale=scale, enable_gqa=True
            )

    t_ours = time_ms(ours, 1, iters, reps, graph=False)
    t_sdpa = time_ms(sdpa_contig, 1, iters, reps, graph=False)
    t_bool = time_ms(sdpa_boolmask, 1, iters, reps, graph=False)
    t_pure = time_ms(sdpa_pure, 1, iters, reps, graph=False)
    flops = 4 * num_seqs * chunk * context * NUM_HEADS * HEAD_DIM  # QK + PV, full rectangle
    return {
        "num_seqs": num_seqs,
        "context": context,
        "chunk": chunk,
        "gather_sdpa_us": t_ours * 1e3,
        "sdpa_contig_us": t_sdpa * 1e3,
        "sdpa_boolmask_contig_us": t_bool * 1e3,
        "sdpa_pure_us": t_pure * 1e3,
        "gather_overhead": t_ours / t_sdpa,
        "over_sdpa_pure": t_ours / t_pure,
        "gather_sdpa_TFLOPs": flops / t_ours / 1e9,
    }
