"""Sparse paged decode on CUDA against the torch reference (GPU machines only)."""

from __future__ import annotations

import math

import pytest
import torch

from cuda_kernels import ops, reference
from cuda_kernels import sparse_reference as sr

pytestmark = pytest.mark.gpu

BS = 16


def _setup(lens: list[int], hkv: int, group: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb = sum(math.ceil(max(n, 1) / BS) for n in lens) + 7
    k_cache = torch.randn((nb, BS, hkv, d), generator=g, device="cuda").to(dtype)
    v_cache = torch.randn((nb, BS, hkv, d), generator=g, device="cuda").to(dtype)
    perm = torch.randperm(nb, generator=g, device="cuda").to(torch.int32)
    width = max(math.ceil(max(n, 1) / BS) for n in lens)
    bt = torch.zeros((len(lens), width), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(lens):
        m = math.ceil(n / BS)
        bt[i, :m] = perm[used : used + m]
        used += m
    # page metadata written the engine's way: every token through update_page_minmax
    k_min = torch.zeros((nb, hkv, d), dtype=dtype, device="cuda")
    k_max = torch.zeros_like(k_min)
    slots = [int(bt[i, t // BS]) * BS + t % BS for i, n in enumerate(lens) for t in range(n)]
    slot_mapping = torch.tensor(slots, device="cuda")
    keys = k_cache.view(-1, hkv, d)[slot_mapping]
    ops.update_page_minmax(keys, k_min, k_max, slot_mapping, BS)
    q = torch.randn((len(lens), hkv * group, d), generator=g, device="cuda").to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, k_min, k_max, bt, sl


@pytest.mark.parametrize("d,hkv,group", [(64, 3, 3), (128, 8, 4), (64, 2, 16), (128, 4, 1)])
def test_sparse_scores_and_attention_match_reference(d: int, hkv: int, group: int) -> None:
    from cuda_kernels import sparse_decode

    torch.manual_seed(0)
    lens = [3000, 257, 16, 0, 1, 1100]
    q, kc, vc, lo, hi, bt, sl = _setup(lens, hkv, group, d, torch.bfloat16, seed=d + group)
    # metadata equals a cache-side recomputation
    for i, n in enumerate(lens[:2]):
        p = (n - 1) // BS
        rows = kc[int(bt[i, p]), : n - p * BS]
        assert torch.equal(lo[int(bt[i, p])], rows.amin(0))
        assert torch.equal(hi[int(bt[i, p])], rows.amax(0))
    expect = sr.page_scores(q, lo, hi, bt, sl, BS)
    for variant in ("warp", "thread"):
        scores = sparse_decode.page_scores(q, lo, hi, bt, sl, BS, variant)
        torch.testing.assert_close(scores, expect, atol=2e-3, rtol=1e-4)
    # phase 2 on the SAME selection equals the reference attention over it
    sel = sr.select_pages(expect, bt, sl, BS, 512 // BS)
    out = sparse_decode.decode_selected(q, kc, vc, sel, d**-0.5)
    qv = q.float().reshape(len(lens) * hkv, group, d)
    ref = reference.paged_decode_attention(
        qv, sr.virtual_cache(kc.float()), sr.virtual_cache(vc.float()), sel.block_tables,
        sel.seq_lens, d**-0.5,
    ).view_as(q)  # fmt: skip
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    assert bool((out[3] == 0).all())


def test_sparse_with_budget_covering_context_equals_dense_kernel() -> None:
    lens = [4096, 1000, 77]
    q, kc, vc, lo, hi, bt, sl = _setup(lens, 8, 4, 128, torch.float16, seed=3)
    out, sel = ops.sparse_paged_decode_attention(q, kc, vc, lo, hi, bt, sl, 0.1, 4096)
    dense = ops.paged_decode_attention(q, kc, vc, bt, sl, 0.1)
    torch.testing.assert_close(out, dense, atol=2e-3, rtol=2e-3)
    assert sel.seq_lens.view(3, 8)[:, 0].tolist() == lens


def test_sparse_decode_is_cuda_graph_capturable() -> None:
    lens = [2048, 600]
    q, kc, vc, lo, hi, bt, sl = _setup(lens, 4, 4, 64, torch.bfloat16, seed=4)
    eager, _ = ops.sparse_paged_decode_attention(q, kc, vc, lo, hi, bt, sl, 0.125, 256)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.sparse_paged_decode_attention(q, kc, vc, lo, hi, bt, sl, 0.125, 256)  # warm-up
        with torch.cuda.graph(graph, stream=stream):
            captured, _ = ops.sparse_paged_decode_attention(q, kc, vc, lo, hi, bt, sl, 0.125, 256)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)


@pytest.mark.parametrize("budget_pages", [2, 7, 64, 300])
def test_select_kernel_matches_torch_topk(budget_pages: int) -> None:
    from cuda_kernels import sparse_decode

    g = torch.Generator(device="cuda").manual_seed(budget_pages)
    lens = [4000, 16, 0, 1, 33, 2048, 4096 - 3]  # NOTE: <= width * BS (the contract)
    hkv, width = 3, 256
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    bt = torch.randint(0, 10_000, (len(lens), width), generator=g, device="cuda")
    bt = bt.to(torch.int32)
    raw = torch.randn((len(lens), hkv, width), generator=g, device="cuda")
    raw[0, 0, 10:20] = 0.5  # NOTE: ties at the threshold must not overfill the row
    scores = sr.force_pages(raw, sl, BS)
    got = sparse_decode.select_pages(scores, bt, sl, BS, budget_pages)
    want = sr.select_pages(scores, bt, sl, BS, budget_pages)
    assert torch.equal(got.seq_lens, want.seq_lens)
    k = got.page_ids.shape[1]
    for r in range(len(lens) * hkv):
        n = min(-(-min(lens[r // hkv], width * BS) // BS), k)
        got_ids, want_ids = got.page_ids[r, :n], want.page_ids[r, :n]
        if r == 0 and budget_pages in (7, 64):
            # tied scores: same count, every page strictly above the k-th score in both
            kth = scores[0, 0, want_ids].min()
            assert bool((scores[0, 0, got_ids] >= kth).all())
            assert torch.equal(got_ids, got_ids.sort().values)
            continue
        assert torch.equal(got_ids, want_ids), r
        assert torch.equal(got.block_tables[r, :n], want.block_tables[r, :n]), r
        assert bool((got.page_ids[r, n:] == width).all())


def test_page_meta_kernel_matches_the_incremental_rule() -> None:
    from cuda_kernels import sparse_decode

    g = torch.Generator(device="cuda").manual_seed(9)
    hkv, d, nb = 4, 64, 50
    kc = torch.zeros((nb, BS, hkv, d), dtype=torch.bfloat16, device="cuda")
    vc = torch.zeros_like(kc)
    stale = torch.full((nb, hkv, d), 7.0, dtype=torch.bfloat16, device="cuda")
    lo_t, hi_t, lo_k, hi_k = stale.clone(), -stale, stale.clone(), -stale
    tables = {0: [3, 17, 9, 40], 1: [5, 22]}

    def slots(seq: int, start: int, end: int) -> list[int]:
        return [tables[seq][t // BS] * BS + t % BS for t in range(start, end)]

    steps = [[*slots(0, 0, 38), -1, *slots(1, 0, 21), -1], slots(0, 38, 39) + slots(1, 21, 22)]
    steps += [[*slots(0, t, t + 1), -1] for t in range(39, 51)]
    for step in steps:
        sm = torch.tensor(step, device="cuda")
        key = torch.randn((len(step), hkv, d), generator=g, device="cuda").to(torch.bfloat16)
        ops.reshape_and_cache(key, key, kc, vc, sm)
        sr.update_page_minmax(key, lo_t, hi_t, sm, BS)
        sparse_decode.update_page_minmax(lo_k, hi_k, kc, sm)
    assert torch.equal(lo_k, lo_t) and torch.equal(hi_k, hi_t)
    assert bool((lo_k[0] == 7).all()), "blocks nobody wrote keep their (stale) values"
