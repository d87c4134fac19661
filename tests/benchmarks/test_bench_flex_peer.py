"""The FlexAttention decode peer computes paged decode attention (uncompiled, on CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from cuda_kernels import reference

flex_peer = pytest.importorskip("benchmarks.flex_peer")


def test_flex_paged_decode_equals_reference_on_scattered_tables() -> None:
    gen = torch.Generator().manual_seed(0)
    num_seqs, heads, kv_heads, dim, block_size, num_blocks = 3, 8, 2, 64, 16, 40
    q = torch.randn((num_seqs, heads, dim), generator=gen)
    k_cache = torch.randn((num_blocks, block_size, kv_heads, dim), generator=gen)
    v_cache = torch.randn((num_blocks, block_size, kv_heads, dim), generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * 8].view(num_seqs, 8).int()
    lens = torch.tensor([100, 128, 17], dtype=torch.int32)  # partial last pages included
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile()"
        out = flex_peer.make_flex_paged_decode(
            q, k_cache, v_cache, tables, lens, 0.125, compile=False
        )()
    ref = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < 1e-5
