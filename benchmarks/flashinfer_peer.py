"""FlashInfer's paged decode over our KV cache: the library peer of kernels_bench (issue 15).

Our cache ``[num_blocks, block_size, num_kv_heads, head_dim]`` per K and V is FlashInfer's
"NHD" page layout as it is (a page = a block), passed as the ``(k_cache, v_cache)`` tuple: no
copy. Our ``block_tables`` / ``seq_lens`` become FlashInfer's CSR page list
(``paged_kv_layout``): ``indptr`` [num_seqs + 1], ``indices`` (every sequence's used block
ids, in order) and ``last_page_len`` [num_seqs] (tokens in each sequence's last page).

``make_flashinfer_paged_decode(...)`` plans once (host work, outside any timing) and returns a
zero-argument callable producing ``[num_seqs, num_heads, head_dim]``; it raises FlashInfer's
own error when the library is missing or cannot build its kernel (kernels_bench records it).
FlashInfer compiles its kernels on first use (JIT, nvcc + ninja): the first call of a new
configuration takes ~minutes, later runs load them from ``~/.cache/flashinfer``.

Chosen because vLLM and SGLang decode through it on Hopper: it is the bar the issue names.
Carried to the GPU machine as wheels (``scripts/gpu_flashinfer_wheels.sh``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace for split-KV decode


def paged_kv_layout(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32, padded past each sequence
    seq_lens: torch.Tensor,  # [num_seqs] int, >= 1
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indptr, indices, last_page_len), int32 on the tables' device: FlashInfer's CSR view
    of the pages that hold each sequence's ``seq_len`` tokens."""
    if bool((seq_lens < 1).any()):
        raise ValueError("every sequence needs at least one token")
    lens = seq_lens.to(torch.int64)
    num_pages = (lens + block_size - 1) // block_size
    if int(num_pages.max()) > block_tables.shape[1]:
        raise ValueError("a sequence needs more blocks than its table row holds")
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=block_tables.device)
    indptr[1:] = torch.cumsum(num_pages, 0).to(torch.int32)
    used = torch.arange(block_tables.shape[1], device=block_tables.device) < num_pages[:, None]
    indices = block_tables[used].to(torch.int32)  # row-major: each sequence's pages in order
    last_page_len = (lens - (num_pages - 1) * block_size).to(torch.int32)
    return indptr, indices, last_page_len


def make_flashinfer_paged_decode(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    use_tensor_cores: bool = False,
) -> Callable[[], torch.Tensor]:
    import flashinfer  # NOTE: optional, GPU machine only (module docstring)

    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    indptr, indices, last_page_len = paged_kv_layout(block_tables, seq_lens, block_size)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_tensor_cores=use_tensor_cores
    )
    wrapper.plan(
        indptr, indices, last_page_len, num_heads, num_kv_heads, head_dim, block_size,
        q_data_type=q.dtype, kv_data_type=k_cache.dtype, sm_scale=scale,
    )  # fmt: skip
    cache = (k_cache, v_cache)

    def run() -> torch.Tensor:
        out: torch.Tensor = wrapper.run(q, cache)
        return out

    return run
