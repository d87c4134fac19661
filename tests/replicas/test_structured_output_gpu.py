"""Structured output on CUDA: the sampler's bitmask applied to GPU logits gives the CPU result
and xgrammar's own GPU kernel's, on a row subset, in fp32 and bf16, at real vocab sizes."""

from __future__ import annotations

import pytest
import torch

from replicas.structured_output import apply_token_bitmask, bitmask_words

xgr = pytest.importorskip("xgrammar")

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49152, 128256])
def test_bitmask_on_cuda_matches_cpu_and_xgrammar(vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(16, vocab, generator=gen).to(dtype)
    rows = [0, 3, 4, 9, 15]
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (len(rows), bitmask_words(vocab)), generator=gen, dtype=torch.int32
    )
    cpu = logits.clone()
    apply_token_bitmask(cpu, bitmask, rows)
    gpu = logits.cuda()
    apply_token_bitmask(gpu, bitmask, rows)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
    full = torch.full((16, bitmask_words(vocab)), -1, dtype=torch.int32)
    full[rows] = bitmask
    theirs = logits.cuda()
    xgr.apply_token_bitmask_inplace(theirs, full.cuda(), indices=rows)
    torch.testing.assert_close(gpu, theirs, rtol=0, atol=0)
    untouched = [r for r in range(16) if r not in rows]
    assert torch.equal(gpu[untouched].cpu(), logits[untouched])
    assert bool(torch.isinf(gpu[rows]).any()) and bool(torch.isfinite(gpu[rows]).any())
