"""benchmarks/flashinfer_peer.py: our block tables as FlashInfer's CSR page list (CPU), and on
a GPU with FlashInfer installed, its paged decode equal to our kernel over the same cache."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.flashinfer_peer import make_flashinfer_paged_decode, paged_kv_layout


def test_layout_lists_each_sequences_used_blocks_in_order() -> None:
    tables = torch.tensor([[7, 3, 9, 0], [2, 0, 0, 0], [5, 6, 1, 4]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 4, 13], dtype=torch.int32)  # block_size 4: 3, 1, 4 pages
    indptr, indices, last = paged_kv_layout(tables, seq_lens, 4)
    assert indptr.tolist() == [0, 3, 4, 8]
    assert indices.tolist() == [7, 3, 9, 2, 5, 6, 1, 4]
    assert last.tolist() == [1, 4, 1]
    assert {t.dtype for t in (indptr, indices, last)} == {torch.int32}


def test_layout_addresses_exactly_the_tokens_of_each_sequence() -> None:
    gen = torch.Generator().manual_seed(0)
    bs, rows, width = 16, 9, 12
    tables = torch.randperm(rows * width, generator=gen).to(torch.int32).view(rows, width)
    seq_lens = torch.randint(1, bs * width + 1, (rows,), generator=gen)
    indptr, indices, last = paged_kv_layout(tables, seq_lens, bs)
    for s in range(rows):
        pages = indices[indptr[s] : indptr[s + 1]].tolist()
        slots = [p * bs + o for p in pages[:-1] for o in range(bs)]
        slots += [pages[-1] * bs + o for o in range(int(last[s]))]
        n = int(seq_lens[s])
        want = [int(tables[s, t // bs]) * bs + t % bs for t in range(n)]
        assert slots == want


def test_layout_rejects_what_flashinfer_cannot_address() -> None:
    tables = torch.zeros((2, 2), dtype=torch.int32)
    with pytest.raises(ValueError, match="at least one token"):
        paged_kv_layout(tables, torch.tensor([3, 0]), 4)
    with pytest.raises(ValueError, match="more blocks"):
        paged_kv_layout(tables, torch.tensor([3, 9]), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("use_tensor_cores", [False, True])
def test_flashinfer_decode_equals_ours(use_tensor_cores: bool) -> None:
    """NOT run on CPU CI; needs FlashInfer on the GPU machine (scripts/gpu_flashinfer_wheels.sh)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device machine)")
    pytest.importorskip("flashinfer", reason="FlashInfer is a benchmark peer, not a dependency")
    from cuda_kernels import launchers

    gen = torch.Generator(device="cuda").manual_seed(1)
    heads, kv_heads, d, bs, num_blocks = 32, 8, 128, 16, 256
    shape = (num_blocks, bs, kv_heads, d)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    seq_lens = torch.tensor([1, 17, 300, 1000], dtype=torch.int32, device="cuda")
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    tables = perm[: 4 * 63].view(4, 63)
    q = torch.randn(4, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = 1 / math.sqrt(d)
    got = make_flashinfer_paged_decode(q, k, v, tables, seq_lens, scale, use_tensor_cores)()
    want = launchers.paged_decode_attention(q, k, v, tables, seq_lens, scale)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2
