"""GPU tests: the CuPy/NVRTC kernels against the torch references (marked `gpu`)."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch

from cuda_kernels import reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def launchers() -> ModuleType:
    pytest.importorskip("cupy")
    from cuda_kernels import launchers as mod

    return mod


@pytest.fixture(scope="module")
def block_copy() -> ModuleType:
    pytest.importorskip("cupy")
    from cuda_kernels import block_copy as mod

    return mod


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _tables(
    num_seqs: int, max_blocks: int, num_blocks: int, contiguous: bool, gen: torch.Generator
) -> torch.Tensor:
    if contiguous:
        ids = torch.arange(num_seqs * max_blocks)
    else:
        ids = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks]
    return ids.view(num_seqs, max_blocks).to(torch.int32).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(8, 8), (16, 4), (32, 4), (32, 2)])
@pytest.mark.parametrize("variant", ["mma", "simt"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_decode_matches_reference(
    launchers: ModuleType,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    contiguous: bool,
    variant: str,
) -> None:
    gen = torch.Generator().manual_seed(head_dim + block_size + num_heads + contiguous)
    max_blocks = 12
    cap = max_blocks * block_size
    # seq_len 1, not a multiple of block_size, exactly max blocks, mid-size, 0 (padded row)
    lens = [1, block_size + 3, cap, cap // 2 + 5, 0, 2 * block_size]
    num_seqs = len(lens)
    num_blocks = num_seqs * max_blocks + 7
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).cuda()
    v_cache = torch.randn(shape, generator=gen).to(dtype).cuda()
    query = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(dtype).cuda()
    tables = _tables(num_seqs, max_blocks, num_blocks, contiguous, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32).cuda()
    scale = 1 / math.sqrt(head_dim)
    out = launchers.paged_decode_attention(
        query, k_cache, v_cache, tables, seq_lens, scale, variant=variant
    )
    ref = reference.paged_decode_attention(
        query.float(), k_cache.float(), v_cache.float(), tables, seq_lens, scale
    )
    assert out.shape == query.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert torch.all(out[4] == 0)
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.parametrize(("num_seqs", "context"), [(1, 3001), (3, 1200)])
@pytest.mark.parametrize("variant", ["mma", "simt"])
def test_decode_long_context_many_splits(
    launchers: ModuleType, num_seqs: int, context: int, variant: str
) -> None:
    gen = torch.Generator().manual_seed(context)
    block_size, num_kv_heads, num_heads, head_dim = 16, 2, 16, 128
    max_blocks = -(-context // block_size)
    num_blocks = num_seqs * max_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(torch.bfloat16).cuda()
    v_cache = torch.randn(shape, generator=gen).to(torch.bfloat16).cuda()
    query = (3 * torch.randn(num_seqs, num_heads, head_dim, generator=gen)).bfloat16().cuda()
    tables = _tables(num_seqs, max_blocks, num_blocks, False, gen)
    seq_lens = torch.tensor([context - 7 * i for i in range(num_seqs)], dtype=torch.int32).cuda()
    out = launchers.paged_decode_attention(
        query, k_cache, v_cache, tables, seq_lens, 0.088, variant=variant
    )
    again = launchers.paged_decode_attention(
        query, k_cache, v_cache, tables, seq_lens, 0.088, variant=variant
    )
    assert torch.equal(out, again)  # deterministic: no state carried between calls
    ref = reference.paged_decode_attention(
        query.float(), k_cache.float(), v_cache.float(), tables, seq_lens, 0.088
    )
    assert _rel_err(out, ref) < 1e-2


def test_decode_rejects_bad_input(launchers: ModuleType) -> None:
    k = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16, device="cuda")
    lens = torch.ones(1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="int32"):
        launchers.paged_decode_attention(
            q, k, k, torch.zeros(1, 2, dtype=torch.int64, device="cuda"), lens, 1.0
        )
    with pytest.raises(ValueError, match="contiguous"):
        launchers.paged_decode_attention(
            q,
            k.transpose(0, 1),
            k.transpose(0, 1),
            torch.zeros(1, 2, dtype=torch.int32, device="cuda"),
            lens,
            1.0,
        )
    with pytest.raises(ValueError, match="multiple"):
        launchers.paged_decode_attention(
            torch.zeros(1, 3, 64, dtype=torch.bfloat16, device="cuda"),
            k,
            k,
            torch.zeros(1, 2, dtype=torch.int32, device="cuda"),
            lens,
            1.0,
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_reshape_and_cache_matches_reference(
    launchers: ModuleType, dtype: torch.dtype, slot_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(7)
    num_blocks, block_size, heads, dim, num_tokens = 20, 16, 4, 64, 50
    k_cache = torch.randn(num_blocks, block_size, heads, dim, generator=gen).to(dtype).cuda()
    v_cache = torch.randn(num_blocks, block_size, heads, dim, generator=gen).to(dtype).cuda()
    qkv = torch.randn(num_tokens, 6, heads, dim, generator=gen).to(dtype).cuda()
    key, value = qkv[:, 4], qkv[:, 5]  # strided views, like a fused qkv projection
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::7] = -1
    slots = slots.to(slot_dtype).cuda()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    launchers.reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_reshape_and_cache_rejects_bad_input(launchers: ModuleType) -> None:
    cache = torch.zeros(2, 16, 2, 8, dtype=torch.float16, device="cuda")
    key = torch.zeros(3, 2, 8, dtype=torch.float32, device="cuda")
    slots = torch.zeros(3, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="dtype"):
        launchers.reshape_and_cache(key, key, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        launchers.reshape_and_cache(key.half(), key.half(), cache, cache.clone(), slots[:2])


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ([0, 1, 2], [5, 6, 7]),
        ([5, 4], [4, 3]),
        ([3, 4], [4, 5]),
        ([1, 2, 0], [0, 1, 2]),
        ([2, 2, 6], [6, 7, 2]),
        ([3], [3]),
    ],
)
def test_copy_blocks_sequential_semantics(
    block_copy: ModuleType, src: list[int], dst: list[int]
) -> None:
    caches = [torch.randn(8, 16, 2, 64, device="cuda").to(torch.bfloat16) for _ in range(6)]
    expected = [c.clone() for c in caches]
    for c in expected:
        for s, d in zip(src, dst, strict=True):
            c[d] = c[s].clone()
    block_copy.copy_blocks(caches, torch.tensor(src), torch.tensor(dst))
    for c, e in zip(caches, expected, strict=True):
        assert torch.equal(c, e)


def test_copy_blocks_large_random_matches_reference(block_copy: ModuleType) -> None:
    gen = torch.Generator().manual_seed(11)
    caches = [torch.randn(256, 16, 8, 128, generator=gen).half().cuda() for _ in range(4)]
    src = torch.randint(0, 256, (300,), generator=gen)
    dst = torch.randint(0, 256, (300,), generator=gen)
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected, src, dst)
    block_copy.copy_blocks(caches, src, dst)
    for c, e in zip(caches, expected, strict=True):
        assert torch.equal(c, e)
    with pytest.raises(ValueError, match="block ids"):
        block_copy.copy_blocks(caches, torch.tensor([0]), torch.tensor([256]))


def test_ops_dispatch_on_cuda(launchers: ModuleType) -> None:
    from cuda_kernels import ops

    assert ops.cuda_kernels_available()
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(16, 16, 2, 128, generator=gen).bfloat16().cuda()
    v_cache = torch.randn(16, 16, 2, 128, generator=gen).bfloat16().cuda()
    tables = torch.arange(16, dtype=torch.int32).view(2, 8).cuda()
    q = torch.randn(40, 8, 128, generator=gen).bfloat16().cuda()
    cu = torch.tensor([0, 30, 40], dtype=torch.int32).cuda()
    lens = torch.tensor([30, 100], dtype=torch.int32).cuda()
    out = ops.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, 0.1)
    ref = reference.paged_prefill_attention(
        q.float(), k_cache.float(), v_cache.float(), cu, lens, tables, 0.1
    )
    assert _rel_err(out, ref) < 1e-2


def test_ops_write_then_decode_on_cuda(launchers: ModuleType) -> None:
    """The engine's decode step through ops: write the new token's K/V, then attend."""
    from cuda_kernels import ops

    gen = torch.Generator().manual_seed(21)
    num_blocks, block_size, num_kv, num_heads, dim = 32, 16, 4, 16, 64
    k_cache = torch.zeros(num_blocks, block_size, num_kv, dim, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(4, 8).cuda()
    seq_lens = torch.tensor([5, 40, 128, 77], dtype=torch.int32)
    for i, n in enumerate(seq_lens.tolist()):  # fill each context through slot_mapping
        pos = torch.arange(n)
        slots = (tables[i].cpu()[pos // block_size] * block_size + pos % block_size).cuda()
        key = torch.randn(n, num_kv, dim, generator=gen).cuda()  # fp32: ops casts to bf16
        value = torch.randn(n, num_kv, dim, generator=gen).cuda()
        ops.reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert float(k_cache.abs().sum()) > 0
    q = torch.randn(4, num_heads, dim, generator=gen).bfloat16().cuda()
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens.cuda(), 0.125)
    ref = reference.paged_decode_attention(
        q.float(), k_cache.float(), v_cache.float(), tables, seq_lens.cuda(), 0.125
    )
    assert _rel_err(out, ref) < 1e-2


def test_decode_replays_in_cuda_graph(launchers: ModuleType) -> None:
    gen = torch.Generator().manual_seed(9)
    k_cache = torch.randn(64, 16, 2, 128, generator=gen).bfloat16().cuda()
    v_cache = torch.randn(64, 16, 2, 128, generator=gen).bfloat16().cuda()
    tables = torch.randperm(64, generator=gen).to(torch.int32).view(4, 16).cuda()
    seq_lens = torch.tensor([1, 100, 256, 17], dtype=torch.int32).cuda()
    q = torch.randn(4, 8, 128, generator=gen).bfloat16().cuda()
    launchers.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.1)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launchers.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.1)
    q.copy_(torch.randn(4, 8, 128, generator=gen).bfloat16().cuda())  # new step, same buffers
    seq_lens.copy_(torch.tensor([2, 101, 200, 18], dtype=torch.int32).cuda())
    graph.replay()
    eager = launchers.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.1)
    assert torch.equal(out, eager)


def test_block_copy_plan_runs_in_cuda_graph(block_copy: ModuleType) -> None:
    caches = [torch.randn(32, 16, 2, 64, device="cuda").half() for _ in range(4)]
    src, dst = torch.tensor([4, 5, 6]), torch.tensor([3, 4, 5])  # slide down: staged path
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected, src, dst)
    plan = block_copy.plan_block_copies(caches, src, dst)
    assert plan.num_staged == 2
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run()
    graph.replay()
    for c, e in zip(caches, expected, strict=True):
        assert torch.equal(c, e)
