"""CPU tests: the torch references (the CPU serving path) against naive dense attention."""

from __future__ import annotations

import math

import pytest
import torch

from cuda_kernels import ops, reference


def _dense_kv(cache: torch.Tensor, table: list[int], n: int) -> torch.Tensor:
    """[n, H, D] float64, token by token through the block table (the slow, obvious way)."""
    bs = cache.shape[1]
    rows = [cache[table[t // bs], t % bs] for t in range(n)]
    return torch.stack(rows).double()


def _naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_pos: list[int]
) -> torch.Tensor:
    """q [T, H, D], k/v [L, Hkv, D]; token t sees keys 0..q_pos[t]. float64."""
    num_heads, num_kv = q.shape[1], k.shape[1]
    group = num_heads // num_kv
    out = torch.empty(q.shape, dtype=torch.float64)
    for t, p in enumerate(q_pos):
        for h in range(num_heads):
            kh, vh = k[: p + 1, h // group], v[: p + 1, h // group]
            w = torch.softmax((kh @ q[t, h].double()) * scale, dim=0)
            out[t, h] = w @ vh
    return out


def _random_tables(
    num_seqs: int, max_blocks: int, num_blocks: int, gen: torch.Generator, contiguous: bool
) -> torch.Tensor:
    if contiguous:
        ids = torch.arange(num_seqs * max_blocks)
    else:
        ids = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks]
    return ids.view(num_seqs, max_blocks).to(torch.int32)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_decode_matches_naive(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, contiguous: bool
) -> None:
    gen = torch.Generator().manual_seed(num_heads * 7 + num_kv_heads + contiguous)
    block_size, head_dim, max_blocks, num_blocks = 16, 32, 5, 40
    seq_lens = torch.tensor([1, 17, 80, 33], dtype=torch.int32)  # 80 = max_blocks * block_size
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    query = torch.randn(4, num_heads, head_dim, generator=gen).to(dtype)
    tables = _random_tables(4, max_blocks, num_blocks, gen, contiguous)
    scale = 1 / math.sqrt(head_dim)
    out = ops.paged_decode_attention(query, k_cache, v_cache, tables, seq_lens, scale)
    assert out.shape == query.shape and out.dtype == dtype
    for i, n in enumerate(seq_lens.tolist()):
        tb = tables[i].tolist()
        ref = _naive_attention(
            query[i : i + 1], _dense_kv(k_cache, tb, n), _dense_kv(v_cache, tb, n), scale, [n - 1]
        )
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert _rel_err(out[i : i + 1], ref) < tol


def test_decode_zero_len_row_is_zero_and_padding_ignored() -> None:
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(8, 16, 2, 16, generator=gen)
    v_cache = torch.randn(8, 16, 2, 16, generator=gen)
    query = torch.randn(2, 4, 16, generator=gen)
    tables = torch.tensor([[3, -1, -1], [5, 6, -1]], dtype=torch.int32)  # -1 = unused entries
    out = ops.paged_decode_attention(
        query, k_cache, v_cache, tables, torch.tensor([0, 20], dtype=torch.int32), 0.25
    )
    assert torch.all(out[0] == 0)
    ref = _naive_attention(
        query[1:], _dense_kv(k_cache, [5, 6], 20), _dense_kv(v_cache, [5, 6], 20), 0.25, [19]
    )
    assert _rel_err(out[1:], ref) < 1e-5


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 2)])
def test_prefill_chunk_over_cached_prefix(num_heads: int, num_kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(5)
    block_size, head_dim, num_blocks = 16, 16, 32
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q_lens, seq_lens = [5, 20, 1, 37], [5, 50, 9, 37]  # fresh, chunk over prefix, 1 token, full
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    tables = _random_tables(4, 4, num_blocks, gen, contiguous=False)
    query = torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen)
    scale = 0.3
    out = ops.paged_prefill_attention(
        query, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, scale
    )
    for i, (ql, n) in enumerate(zip(q_lens, seq_lens, strict=True)):
        tb = tables[i].tolist()
        ref = _naive_attention(
            query[cu[i] : cu[i + 1]],
            _dense_kv(k_cache, tb, n),
            _dense_kv(v_cache, tb, n),
            scale,
            list(range(n - ql, n)),
        )
        assert _rel_err(out[cu[i] : cu[i + 1]], ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reshape_and_cache_writes_slots_and_skips_padding(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    k_cache = torch.full((6, 4, 2, 8), 7.0).to(dtype)
    v_cache = torch.full((6, 4, 2, 8), 7.0).to(dtype)
    # NOTE: a strided key (slice of a fused qkv row), like the engine's projection output.
    qkv = torch.randn(5, 3, 2, 8, generator=gen).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([0, 9, -1, 23, 5], dtype=torch.int32)
    ops.reshape_and_cache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(24, 2, 8), v_cache.view(24, 2, 8)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[i]) and torch.equal(flat_v[s], value[i])
    untouched = [s for s in range(24) if s not in (0, 9, 23, 5)]
    assert torch.all(flat_k[untouched] == 7) and torch.all(flat_v[untouched] == 7)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ([0, 1, 2], [5, 6, 7]),  # disjoint
        ([5, 4], [4, 3]),  # chain: 4 is written after it was read
        ([3, 4], [4, 5]),  # chain the other way: 5 gets the ORIGINAL 3 via 4
        ([1, 2, 0], [0, 1, 2]),  # rotation (needs the original of 1 after 1 was overwritten)
        ([2, 2, 6], [6, 7, 2]),  # fan-out, then overwrite a source
        ([3], [3]),  # self copy
    ],
)
def test_copy_blocks_sequential_semantics(src: list[int], dst: list[int]) -> None:
    gen = torch.Generator().manual_seed(3)
    caches = [torch.randn(8, 4, 2, 4, generator=gen) for _ in range(4)]
    expected = [c.clone() for c in caches]
    for c in expected:
        for s, d in zip(src, dst, strict=True):
            c[d] = c[s].clone()
    ops.copy_blocks(caches, torch.tensor(src), torch.tensor(dst))
    for c, e in zip(caches, expected, strict=True):
        assert torch.equal(c, e)


def test_resolve_block_copies_is_a_parallel_gather() -> None:
    src_ids, dst_ids = reference.resolve_block_copies([1, 2, 0, 5], [0, 1, 2, 5])
    assert sorted(dst_ids) == [0, 1, 2] and len(set(dst_ids)) == len(dst_ids)
    assert dict(zip(dst_ids, src_ids, strict=True)) == {0: 1, 1: 2, 2: 1}
    with pytest.raises(ValueError):
        reference.resolve_block_copies([1], [])
