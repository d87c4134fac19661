"""Sparse paged decode (Quest page selection): torch reference semantics on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from cuda_kernels import reference
from cuda_kernels import sparse_reference as sr

BS = 16


def _pool(num_blocks: int, hkv: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BS, hkv, d)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _tables(seq_lens: list[int], num_blocks: int, seed: int) -> torch.Tensor:
    """Disjoint random block_ids per sequence (like a fragmented pool)."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    width = max(math.ceil(n / BS) for n in seq_lens)
    bt = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    used = 0
    for i, n in enumerate(seq_lens):
        nb = math.ceil(n / BS)
        bt[i, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    return bt


def _meta_from_cache(k_cache: torch.Tensor, bt: torch.Tensor, seq_lens: list[int]):
    nb, _, hkv, d = k_cache.shape
    lo = torch.full((nb, hkv, d), float("inf"))
    hi = torch.full((nb, hkv, d), float("-inf"))
    for i, n in enumerate(seq_lens):
        for p in range(math.ceil(n / BS)):
            b = int(bt[i, p])
            rows = k_cache[b, : min(BS, n - p * BS)]
            lo[b], hi[b] = rows.amin(0), rows.amax(0)
    return lo, hi


def test_update_page_minmax_tracks_written_keys_and_resets_reused_blocks() -> None:
    hkv, d, nb = 2, 8, 12
    k_cache = torch.zeros((nb, BS, hkv, d))
    v_cache = torch.zeros_like(k_cache)
    # NOTE: stale metadata from a previous owner of every block must be discarded.
    k_min = torch.full((nb, hkv, d), -100.0)
    k_max = torch.full((nb, hkv, d), 100.0)
    bt = _tables([40, 23], nb, seed=1)
    g = torch.Generator().manual_seed(2)
    # prefill chunk 1: seq 0 tokens 0..29, seq 1 tokens 0..22, plus padding rows
    slots, written = [], {0: 30, 1: 23}
    for i, n in written.items():
        slots += [int(bt[i, t // BS]) * BS + t % BS for t in range(n)]
    slots += [-1, -1]
    key = torch.randn((len(slots), hkv, d), generator=g)
    reference.reshape_and_cache(key, key, k_cache, v_cache, torch.tensor(slots))
    sr.update_page_minmax(key, k_min, k_max, torch.tensor(slots), BS)
    # then decode-style single tokens continuing mid-block for seq 0: tokens 30..39
    for t in range(30, 40):
        slot = torch.tensor([int(bt[0, t // BS]) * BS + t % BS])
        key = torch.randn((1, hkv, d), generator=g)
        reference.reshape_and_cache(key, key, k_cache, v_cache, slot)
        sr.update_page_minmax(key, k_min, k_max, slot, BS)
    lo, hi = _meta_from_cache(k_cache, bt, [40, 23])
    used = sorted({int(b) for b in bt[0, :3]} | {int(b) for b in bt[1, :2]})
    assert torch.equal(k_min[used], lo[used]) and torch.equal(k_max[used], hi[used])
    untouched = [b for b in range(nb) if b not in used]
    assert bool((k_min[untouched] == -100).all()), "padding rows must not touch any block"


def test_page_scores_bound_every_key_and_force_first_and_last_pages() -> None:
    hkv, group, d = 2, 3, 16
    lens = [100, 33, 1, 0]
    k_cache, _ = _pool(20, hkv, d, seed=3)
    bt = _tables([max(n, 1) for n in lens], 20, seed=4)
    lo, hi = _meta_from_cache(k_cache, bt, lens)
    q = torch.randn((len(lens), hkv * group, d), generator=torch.Generator().manual_seed(5))
    scores = sr.page_scores(q, lo, hi, bt, torch.tensor(lens, dtype=torch.int32), BS)
    assert scores.shape == (len(lens), hkv, bt.shape[1])
    for i, n in enumerate(lens):
        pages = math.ceil(n / BS)
        for p in range(bt.shape[1]):
            s = scores[i, :, p]
            if p >= pages:
                assert bool((s == float("-inf")).all())
            elif p in (0, pages - 1):
                assert bool((s == float("inf")).all())
            else:
                keys = k_cache[int(bt[i, p]), : min(BS, n - p * BS)]  # [T, Hkv, D]
                qk = torch.einsum("hgd,thd->thg", q[i].view(hkv, group, d), keys)
                assert bool((s >= qk.amax(dim=(0, 2)) - 1e-5).all())


def _masked_dense(q, k_cache, v_cache, bt, seq_lens, page_ids, scale):
    """Independent check: per (seq, KV head) softmax over the tokens of the chosen pages."""
    num_heads = q.shape[1]
    hkv = k_cache.shape[2]
    group = num_heads // hkv
    out = torch.zeros_like(q)
    for i, n in enumerate(seq_lens):
        for h in range(hkv):
            pages = [int(p) for p in page_ids[i * hkv + h] if int(p) * BS < n]
            pos = [p * BS + o for p in pages for o in range(BS) if p * BS + o < n]
            if not pos:
                continue
            blocks = torch.tensor([int(bt[i, t // BS]) for t in pos])
            offs = torch.tensor([t % BS for t in pos])
            k, v = k_cache[blocks, offs, h], v_cache[blocks, offs, h]  # [T, D]
            qh = q[i, h * group : (h + 1) * group]  # [G, D]
            out[i, h * group : (h + 1) * group] = torch.softmax(qh @ k.T * scale, -1) @ v
    return out


@pytest.mark.parametrize("hkv,group", [(2, 3), (1, 1), (3, 4)])
def test_sparse_decode_attends_exactly_the_selected_top_pages(hkv: int, group: int) -> None:
    d, budget = 16, 4 * BS
    lens = [150, 64, 17, 0, 40]
    k_cache, v_cache = _pool(40, hkv, d, seed=6)
    bt = _tables([max(n, 1) for n in lens], 40, seed=7)
    lo, hi = _meta_from_cache(k_cache, bt, lens)
    q = torch.randn((len(lens), hkv * group, d), generator=torch.Generator().manual_seed(8))
    sl = torch.tensor(lens, dtype=torch.int32)
    out, sel = sr.sparse_paged_decode_attention(q, k_cache, v_cache, lo, hi, bt, sl, 0.25, budget)
    scores = sr.page_scores(q, lo, hi, bt, sl, BS)
    for i, n in enumerate(lens):
        pages = math.ceil(n / BS)
        for h in range(hkv):
            row = sel.page_ids[i * hkv + h].tolist()
            valid = [p for p in row if p < pages]
            assert valid == sorted(valid) and len(valid) == min(4, pages)
            assert int(sel.seq_lens[i * hkv + h]) == sum(min(BS, n - p * BS) for p in valid)
            if pages:
                assert {0, pages - 1} <= set(valid)
                worst = scores[i, h, valid].min()
                dropped = [p for p in range(pages) if p not in valid]
                assert all(float(scores[i, h, p]) <= float(worst) for p in dropped)
    expect = _masked_dense(q, k_cache, v_cache, bt, lens, sel.page_ids, 0.25)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    assert bool((out[3] == 0).all()), "seq_len 0 rows give zeros"


def test_sparse_decode_with_budget_covering_the_context_equals_dense() -> None:
    hkv, group, d = 2, 2, 16
    lens = [70, 33, 128]
    k_cache, v_cache = _pool(30, hkv, d, seed=9)
    bt = _tables(lens, 30, seed=10)
    lo, hi = _meta_from_cache(k_cache, bt, lens)
    q = torch.randn((3, hkv * group, d), generator=torch.Generator().manual_seed(11))
    sl = torch.tensor(lens, dtype=torch.int32)
    out, _ = sr.sparse_paged_decode_attention(q, k_cache, v_cache, lo, hi, bt, sl, 0.3, 128)
    dense = reference.paged_decode_attention(q, k_cache, v_cache, bt, sl, 0.3)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
