"""Public kernel entry points the engine calls (stable signatures).

Each function dispatches to the CUDA launcher (cuda_kernels.launchers, CuPy/NVRTC kernels on
torch's current stream) when the tensors live on CUDA, CuPy imports and the shape/dtype is one
the kernel supports; otherwise to the pure-torch reference (cuda_kernels.reference), which is
the CPU serving path. Set TINYSERVE_REFERENCE_KERNELS=1 to force the reference everywhere.

Layouts (flash layout; ``slot = block_id * block_size + offset``, -1 = padding)::

    k_cache, v_cache   [num_blocks, block_size, num_kv_heads, head_dim]   one pair per layer
    key, value         [num_tokens, num_kv_heads, head_dim]   (token stride may be padded)
    query (decode)     [num_seqs, num_heads, head_dim]         one new token per sequence
    query (prefill)    [num_tokens, num_heads, head_dim]       sequences concatenated
    block_tables       [num_seqs, max_blocks] int32            row i = block_ids of sequence i
    seq_lens           [num_seqs] int32     context length INCLUDING the new token(s)
    cu_seqlens_q       [num_seqs + 1] int32 prefix sums of new tokens per sequence
    slot_mapping       [num_tokens] int32/int64

Signatures::

    reshape_and_cache(key, value, k_cache, v_cache, slot_mapping) -> None   (mutates caches)
    paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale) -> Tensor
    paged_prefill_attention(query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
                            scale) -> Tensor
    warm_up_prefill(k_cache, v_cache, num_heads) -> bool   (compiles the CUDA prefill kernel)
    copy_blocks(kv_caches: list[Tensor], src: Tensor, dst: Tensor) -> None  (mutates caches)
    rms_norm(x, weight, eps, residual=None) -> (out, residual_out)        (consumes x, residual)
    rope_and_cache(q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping)
        -> (q_rot, k_rot)                                     (consumes q, k; mutates caches)
    silu_and_mul(gate_up) -> Tensor
    update_page_minmax(key, k_min, k_max, slot_mapping, block_size, k_cache=None) -> None
                                                                             (mutates meta)
    sparse_paged_decode_attention(query, k_cache, v_cache, k_min, k_max, block_tables,
                                  seq_lens, scale, token_budget) -> (Tensor, PageSelection)

GQA: num_heads % num_kv_heads == 0. Decode/prefill outputs are new tensors shaped and typed
like query. Prefill expects the chunk's own K/V already written (reshape_and_cache first).
copy_blocks has sequential semantics: same result as ``for s, d in zip(src, dst):
cache[d] = cache[s]`` in order, for every cache in kv_caches (K and V of every layer).
Prefill on CUDA is the Triton kernel cuda_kernels.prefill_triton (flash-attention-2 style,
K/V read through block_tables, GQA without expansion) when triton imports, fp16/bf16 and head
dim 64/128; else gather + torch SDPA (the reference). TINYSERVE_PREFILL_BACKEND=sdpa forces
the latter for A/B (prefill_backend()); benchmarks/prefill_bench.py times both against SDPA
over contiguous K/V. Pass cu_seqlens_q and seq_lens of prefill as CPU tensors (they are read
on the host), and src/dst of copy_blocks likewise. Decode reads
nothing on the host: it is CUDA-graph capturable (bound: block_tables width * block_size).
"""

from __future__ import annotations

import functools
import os

import torch

from cuda_kernels import fused_reference, reference, sparse_reference


@functools.cache
def cuda_kernels_available() -> bool:
    """True when CUDA is present and CuPy imports (the CUDA path can run)."""
    if os.environ.get("TINYSERVE_REFERENCE_KERNELS", "") not in ("", "0"):
        return False
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and cuda_kernels_available()


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new K/V rows into the caches at slot_mapping (-1 skipped). Mutates the caches."""
    if _on_cuda(key):
        from cuda_kernels import launchers

        if key.dtype != k_cache.dtype:  # NOTE: same casting rule as the reference
            key, value = key.to(k_cache.dtype), value.to(k_cache.dtype)
        launchers.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
        return
    reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention through block tables; returns [num_seqs, num_heads, head_dim]."""
    if _on_cuda(query):
        from cuda_kernels import launchers

        if launchers.decode_supported(query, k_cache):
            return launchers.paged_decode_attention(
                query, k_cache, v_cache, block_tables, seq_lens, scale
            )
    return reference.paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal chunked-prefill attention over the cached prefix; returns [num_tokens, H, D].
    On CUDA: the Triton kernel (cuda_kernels.prefill_triton) where it applies, else (or with
    TINYSERVE_PREFILL_BACKEND=sdpa) the reference, gather + SDPA (prefill_backend())."""
    if query.is_cuda and prefill_backend() == "triton":
        from cuda_kernels import prefill_triton

        if prefill_triton.supported(query, k_cache):
            return prefill_triton.paged_prefill_attention(
                query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale
            )
        if os.environ.get(PREFILL_BACKEND_ENV) == "triton":
            raise ValueError(
                f"{PREFILL_BACKEND_ENV}=triton but the kernel does not support query "
                f"{tuple(query.shape)} {query.dtype} over cache {tuple(k_cache.shape)} {k_cache.dtype}"
            )
    return reference.paged_prefill_attention(
        query, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale
    )


def warm_up_prefill(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> bool:
    """Compile the CUDA prefill kernel for this layer shape now (engine start-up), so the
    first request does not wait for it; True when a kernel was compiled/launched."""
    if not (k_cache.is_cuda and prefill_backend() == "triton"):
        return False
    from cuda_kernels import prefill_triton

    query = k_cache.new_empty((1, num_heads, k_cache.shape[3]))
    if not prefill_triton.supported(query, k_cache):
        return False
    prefill_triton.warm_up(k_cache, v_cache, num_heads)
    return True


PREFILL_BACKEND_ENV = "TINYSERVE_PREFILL_BACKEND"
PREFILL_BACKENDS = ("auto", "triton", "sdpa")


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it ships with CUDA builds of torch; CPU CI may lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def prefill_backend() -> str:
    """The CUDA prefill path: "triton" or "sdpa" (gather + SDPA, the reference).

    $TINYSERVE_PREFILL_BACKEND (read on every call, so one process can A/B): "auto"
    (default: triton when it imports), "triton" (required: raises if triton is missing or the
    shapes are unsupported), "sdpa". TINYSERVE_REFERENCE_KERNELS=1 also selects "sdpa".
    """
    choice = os.environ.get(PREFILL_BACKEND_ENV, "") or "auto"
    if choice not in PREFILL_BACKENDS:
        raise ValueError(f"{PREFILL_BACKEND_ENV} must be one of {PREFILL_BACKENDS}, got {choice!r}")
    if choice == "sdpa":
        return "sdpa"
    if choice == "auto" and os.environ.get("TINYSERVE_REFERENCE_KERNELS", "") not in ("", "0"):
        return "sdpa"
    if not triton_available():
        if choice == "triton":
            raise ValueError(f"{PREFILL_BACKEND_ENV}=triton but triton does not import")
        return "sdpa"
    return "triton"


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * norm(x + residual), x + residual)``; x and residual are consumed (the CUDA
    kernel overwrites them), use only the returned tensors (cuda_kernels.fused_reference)."""
    if _on_cuda(x):
        from cuda_kernels import fused

        if fused.supported_rms_norm(x, residual):
            return fused.rms_norm(x, weight, eps, residual)
    return fused_reference.rms_norm(x, weight, eps, residual)


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k (consumed), then k and v written to the caches at slot_mapping;
    returns the rotated (q, k) (cuda_kernels.fused_reference)."""
    if _on_cuda(q):
        from cuda_kernels import fused

        if fused.supported_rope(q, k_cache):
            return fused.rope_and_cache(
                q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping
            )
    return fused_reference.rope_and_cache(
        q, k, v, cos_table, sin_table, positions, k_cache, v_cache, slot_mapping
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused [num_tokens, 2 * intermediate] projection (new tensor)."""
    if _on_cuda(gate_up):
        from cuda_kernels import fused

        if fused.supported_silu_and_mul(gate_up):
            return fused.silu_and_mul(gate_up)
    return fused_reference.silu_and_mul(gate_up)


def copy_blocks(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy blocks src[i] -> dst[i] in every cache, sequential semantics. Mutates the caches."""
    if kv_caches and _on_cuda(kv_caches[0]):
        from cuda_kernels import block_copy

        block_copy.copy_blocks(kv_caches, src, dst)
        return
    reference.copy_blocks(kv_caches, src, dst)


def update_page_minmax(
    key: torch.Tensor,
    k_min: torch.Tensor,
    k_max: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    k_cache: torch.Tensor | None = None,
) -> None:
    """Fold new keys into the per-block min/max page metadata (sparse decode). Mutates them.
    With k_cache (keys already written there) on CUDA: one kernel (page_meta.cu); else the
    vectorised torch reference (about ten small launches, sync-free)."""
    if (
        k_cache is not None
        and _on_cuda(k_cache)
        and k_cache.dtype in (torch.float16, torch.bfloat16)
    ):
        from cuda_kernels import sparse_decode

        sparse_decode.update_page_minmax(k_min, k_max, k_cache, slot_mapping)
        return
    sparse_reference.update_page_minmax(key, k_min, k_max, slot_mapping, block_size)


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
) -> tuple[torch.Tensor, sparse_reference.PageSelection]:
    """Quest-style decode over the top pages per KV head (cuda_kernels.sparse_reference);
    returns (output [num_seqs, num_heads, head_dim], the PageSelection)."""
    if _on_cuda(query):
        from cuda_kernels import launchers, sparse_decode

        if launchers.decode_supported(query, k_cache) and k_min.shape[2] in (64, 128):
            return sparse_decode.sparse_paged_decode_attention(
                query, k_cache, v_cache, k_min, k_max, block_tables, seq_lens, scale,
                token_budget,
            )  # fmt: skip
    return sparse_reference.sparse_paged_decode_attention(
        query, k_cache, v_cache, k_min, k_max, block_tables, seq_lens, scale, token_budget
    )


__all__ = [
    "copy_blocks",
    "cuda_kernels_available",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_backend",
    "reshape_and_cache",
    "rms_norm",
    "rope_and_cache",
    "silu_and_mul",
    "sparse_paged_decode_attention",
    "update_page_minmax",
    "warm_up_prefill",
]
