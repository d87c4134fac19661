"""Paged prefill attention in Triton: flash-attention-2 style, K/V read through block tables.

One program computes a tile of BLOCK_M query ROWS of one sequence and one KV head. Rows pack
(token, query head of the KV head's group) pairs, so GQA needs no K/V expansion: each K/V
tile is loaded once and serves every query head of the group::

    row r of the sequence (r = 0 .. q_len * GROUP - 1)
      token  = r // GROUP            position prefix + token, prefix = seq_len - q_len
      q head = kv_head * GROUP + r % GROUP

    keys of the tile:  [0, full_end)        every row sees them (no mask)
                       [full_end, kv_end)   causal mask key <= row's position
    full_end = (prefix + first token + 1) rounded down to BLOCK_N; kv_end = prefix + last token + 1

K/V rows come from the flash-layout caches ``[num_blocks, block_size, num_kv_heads, head_dim]``:
key position p lives at ``cache[block_tables[seq, p // block_size], p % block_size, kv_head]``.
Online softmax in fp32 (base 2, scale folded into the exponent); P is cast to the input dtype
for the P @ V product, as in FlashAttention-2. Grid: (row tiles of the longest sequence,
num_kv_heads, num_seqs); tiles past a sequence's rows exit at once; the last tiles (the most
keys) are scheduled first.

``paged_prefill_attention`` is the typed launcher (same contract as
cuda_kernels.reference.paged_prefill_attention). With TRITON_INTERPRET=1 set before triton is
imported, it runs on CPU tensors through Triton's interpreter (tests only: slow, but it
executes this very kernel source; tests/cuda_kernels/prefill_cases.py).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cuda_kernels.checks import require

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
CONFIG_ENV = "TINYSERVE_PREFILL_TRITON_CONFIG"  # "BLOCK_M,BLOCK_N,num_warps,num_stages"


class TileConfig(NamedTuple):
    """Launch configuration: rows per program, keys per loop step, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# NOTE: H100-oriented defaults (issue 15: BLOCK_M 128, BLOCK_N 64). ptxas (sm_90a, Triton 3.6,
# compiled offline) for head_dim 128: 128x64 with 8 warps uses ~180 registers, no spills; with
# 4 warps it spills (255 registers); 128x128x8 uses 255 and its wgmmas serialize at 3 stages.
# benchmarks/prefill_bench.py times every CANDIDATE_CONFIGS entry on the GPU.
DEFAULT_CONFIGS: dict[int, TileConfig] = {
    64: TileConfig(128, 64, 8, 3),
    128: TileConfig(128, 64, 8, 3),
}
CANDIDATE_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(128, 64, 8, 2),
    TileConfig(128, 64, 8, 3),
    TileConfig(128, 32, 8, 3),
    TileConfig(128, 128, 8, 2),
    TileConfig(64, 64, 4, 2),
)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head_off_k, kv_head_off_v,
    stride_kb, stride_ks, stride_vb, stride_vs, scale_log2,
    lo, hi,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """Fold keys [lo, hi) into the running (acc, m_i, l_i); MASKED applies the causal and
    end-of-context masks (positions >= hi are never read)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N] key positions
        if MASKED:
            in_ctx = pos < hi
            blk = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=in_ctx, other=0)
        else:
            blk = tl.load(table_row_ptr + pos // BLOCK_SIZE)
        blk = blk.to(tl.int64)
        in_blk = pos % BLOCK_SIZE
        k_rows = blk * stride_kb + in_blk * stride_ks + kv_head_off_k  # [BLOCK_N]
        v_rows = blk * stride_vb + in_blk * stride_vs + kv_head_off_v
        k_ptrs = k_cache_ptr + k_rows[:, None] + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
        v_ptrs = v_cache_ptr + v_rows[:, None] + offs_d[None, :]
        if MASKED:  # noqa: SIM108 (the statement form is Triton's usual constexpr branch)
            k = tl.load(k_ptrs, mask=in_ctx[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32, unscaled
        if MASKED:
            visible = (pos[None, :] <= q_pos[:, None]) & in_ctx[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        # NOTE: scale > 0, so max(qk) * scale = max(qk * scale); the scale then rides in one
        # FMA per score (qk * scale - m), in log2 units.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:  # noqa: SIM108
            v = tl.load(v_ptrs, mask=in_ctx[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


# NOTE: the block tables' row stride follows the step's widest table; left unspecialised so a
# width that changes divisibility by 16 (or is 1) does not compile a new variant mid-serving.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # NOTE: reversed tile order: the last row tiles see the most keys; start them first.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    row0 = tile * BLOCK_M
    if row0 < q_len * GROUP:
        seq_len = tl.load(seq_lens_ptr + seq)
        prefix = seq_len - q_len
        rows = row0 + tl.arange(0, BLOCK_M)
        tok = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = tok < q_len
        offs_d = tl.arange(0, HEAD_DIM)
        tok64 = (q_start + tok).to(tl.int64)
        q_ptrs = q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        q_pos = prefix + tok
        first_tok = row0 // GROUP
        last_tok = tl.minimum((row0 + BLOCK_M - 1) // GROUP, q_len - 1)
        full_end = (prefix + first_tok + 1) // BLOCK_N * BLOCK_N
        kv_end = prefix + last_tok + 1
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
        kv_off_k = kv_head * stride_kh
        kv_off_v = kv_head * stride_vh
        # NOTE: key 0 is visible to every row, so each row's max is finite after its first
        # tile: no exp2(-inf - -inf) can occur.
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_row_ptr,
            kv_off_k, kv_off_v, stride_kb, stride_ks, stride_vb, stride_vs, scale_log2,
            0, full_end, BLOCK_N, HEAD_DIM, BLOCK_SIZE, False,
        )  # fmt: skip
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_row_ptr,
            kv_off_k, kv_off_v, stride_kb, stride_ks, stride_vb, stride_vs, scale_log2,
            full_end, kv_end, BLOCK_N, HEAD_DIM, BLOCK_SIZE, True,
        )  # fmt: skip
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # padding rows only
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def supported(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the Triton kernel handles these shapes/dtypes (else use the reference)."""
    return (
        query.dim() == 3
        and k_cache.dim() == 4
        and query.dtype in SUPPORTED_DTYPES
        and k_cache.dtype == query.dtype
        and query.shape[2] == k_cache.shape[3]
        and query.shape[2] in SUPPORTED_HEAD_DIMS
        and query.shape[1] % k_cache.shape[2] == 0
    )


def tile_config(head_dim: int) -> TileConfig:
    """The launch configuration: $TINYSERVE_PREFILL_TRITON_CONFIG if set, else the default."""
    env = os.environ.get(CONFIG_ENV, "")
    if env:
        parts = [int(x) for x in env.split(",")]
        require(len(parts) == 4, f"{CONFIG_ENV} must be 'BLOCK_M,BLOCK_N,num_warps,num_stages'")
        return TileConfig(*parts)
    return DEFAULT_CONFIGS[head_dim]


def _host_ints(t: torch.Tensor, name: str) -> list[int]:
    require(t.dim() == 1 and not t.is_floating_point(), f"{name} must be a 1-D integer tensor")
    return [int(x) for x in t.tolist()]  # NOTE: a device sync when t is on CUDA


class _Plan(NamedTuple):
    """The batch's varlen description, checked, with its device copy."""

    key: tuple[torch.device, int, tuple[int, ...], tuple[int, ...]]
    meta: torch.Tensor  # [2 * num_seqs + 1] int32: cu_seqlens_q then seq_lens, on the device
    max_q_len: int
    max_seq_len: int


_last_plan: dict[torch.device, _Plan] = {}


def _plan(cu: list[int], lens: list[int], num_tokens: int, device: torch.device) -> _Plan:
    """Check cu_seqlens_q/seq_lens and upload them; the last plan per device is reused.

    NOTE: the engine calls every layer with the same step metadata: reusing the upload (keyed
    by VALUE, so host buffers updated in place are safe) saves a pinned copy per layer."""
    key = (device, num_tokens, tuple(cu), tuple(lens))
    last = _last_plan.get(device)
    if last is not None and last.key == key:
        return last
    num_seqs = len(lens)
    require(len(cu) == num_seqs + 1 and cu[0] == 0 and cu[-1] == num_tokens,
            "cu_seqlens_q must have num_seqs + 1 entries from 0 to num_tokens")  # fmt: skip
    q_lens = [cu[i + 1] - cu[i] for i in range(num_seqs)]
    for i, (ql, n) in enumerate(zip(q_lens, lens, strict=True)):
        require(0 <= ql <= n, f"sequence {i}: {ql} new tokens but seq_len {n}")
    meta = torch.tensor(cu + lens, dtype=torch.int32)
    if device.type == "cuda":
        meta = meta.pin_memory().to(device, non_blocking=True)
    plan = _Plan(key, meta, max(q_lens, default=0), max(lens, default=0))
    _last_plan[device] = plan
    return plan


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences concatenated
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int, host tensor preferred
    seq_lens: torch.Tensor,  # [num_seqs] int, host tensor preferred
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32 (or int64), on query's device
    scale: float,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Causal chunked-prefill attention over each sequence's cached prefix plus its chunk
    (contract of cuda_kernels.reference.paged_prefill_attention); returns a new tensor shaped
    and typed like query. The chunk's K/V must already be in the caches. Raises ValueError
    for bad input. cu_seqlens_q/seq_lens are read on the host (a sync if they are on CUDA)."""
    require(supported(query, k_cache), "unsupported shapes/dtypes for the Triton prefill kernel")
    require(v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype,
            "k_cache and v_cache differ in shape or dtype")  # fmt: skip
    require(query.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1,
            "head_dim must be the unit-stride dimension of query and caches")  # fmt: skip
    require(k_cache.device == query.device == v_cache.device == block_tables.device,
            "query, caches and block_tables must be on one device")  # fmt: skip
    require(block_tables.dim() == 2 and block_tables.dtype in (torch.int32, torch.int64),
            "block_tables must be [num_seqs, max_blocks] int32 or int64")  # fmt: skip
    cu, lens = _host_ints(cu_seqlens_q, "cu_seqlens_q"), _host_ints(seq_lens, "seq_lens")
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query)
    plan = _plan(cu, lens, num_tokens, query.device)
    num_seqs = len(lens)
    require(block_tables.shape[0] >= num_seqs, "block_tables has fewer rows than sequences")
    require(-(-plan.max_seq_len // block_size) <= block_tables.shape[1],
            f"seq_len {plan.max_seq_len} exceeds the block tables' width")  # fmt: skip
    if num_tokens == 0:
        return out
    require(query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1",
            "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before importing triton)")  # fmt: skip
    cfg = config or tile_config(head_dim)
    group = num_heads // num_kv_heads
    meta = plan.meta
    grid = (triton.cdiv(plan.max_q_len * group, cfg.block_m), num_kv_heads, num_seqs)
    _paged_prefill_kernel[grid](
        query, k_cache, v_cache, out, block_tables, meta, meta[num_seqs + 1 :],
        scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def warm_up(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> None:
    """Compile the kernel for this cache's shapes now (engine start-up) rather than in the
    first prefill step: one 1-token prefill over block 0; writes nothing but a scratch
    output (the caches are only read)."""
    head_dim = k_cache.shape[3]
    query = torch.zeros(1, num_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=k_cache.device)
    one = torch.ones(1, dtype=torch.int32)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    paged_prefill_attention(query, k_cache, v_cache, cu, one, tables, head_dim**-0.5)
