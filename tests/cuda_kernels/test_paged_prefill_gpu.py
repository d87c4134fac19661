"""GPU tests of the Triton paged prefill kernel (cuda_kernels.prefill_triton) against the fp32
gather + SDPA reference, and of ops' dispatch to it (marked `gpu`)."""

from __future__ import annotations

import math

import pytest
import torch
from prefill_cases import CASES, Case, make_case, rel_err

from cuda_kernels import ops

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")
prefill_triton = pytest.importorskip("cuda_kernels.prefill_triton")

TOL = {"float16": 2e-3, "bfloat16": 1.5e-2}  # as tests/cuda_kernels/test_prefill_triton.py


@pytest.mark.parametrize("tiles", ["case", "default"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cases_match_reference(case: Case, tiles: str) -> None:
    inputs = make_case(case, "cuda")
    cfg = None
    if tiles == "case" and case.config is not None:
        cfg = prefill_triton.TileConfig(*case.config)
    out = prefill_triton.paged_prefill_attention(**inputs, config=cfg)
    assert out.shape == inputs["query"].shape and out.dtype == inputs["query"].dtype
    assert rel_err(out, inputs) < TOL[case.dtype]


@pytest.mark.parametrize(
    "cfg", prefill_triton.CANDIDATE_CONFIGS, ids=lambda c: "x".join(map(str, c))
)
def test_benchmark_configs_are_correct(cfg: object) -> None:
    """Every tile config the benchmark sweeps computes the same attention."""
    inputs = make_case(Case(2, 4, 128, "bfloat16", 16, None, 300, 9), "cuda")
    out = prefill_triton.paged_prefill_attention(**inputs, config=cfg)
    assert rel_err(out, inputs) < TOL["bfloat16"]


def test_llama8b_shape_long_prefix() -> None:
    """32 query / 8 KV heads of 128, bf16: a 512-token chunk over a 3.5k prefix, a fresh
    1000-token prompt and a decode-like single token, scattered 16-token blocks."""
    gen = torch.Generator().manual_seed(8)
    lens, q_lens = [4096, 1000, 2049], [512, 1000, 1]
    blocks = [-(-n // 16) for n in lens]
    perm = torch.randperm(sum(blocks) + 7, generator=gen).to(torch.int32)
    tables = torch.full((3, max(blocks)), -1, dtype=torch.int32)
    start = 0
    for i, b in enumerate(blocks):
        tables[i, :b] = perm[start : start + b]
        start += b
    shape = (perm.numel(), 16, 8, 128)
    inputs = {
        "query": torch.randn(sum(q_lens), 32, 128, generator=gen).bfloat16().cuda(),
        "k_cache": torch.randn(shape, generator=gen).bfloat16().cuda(),
        "v_cache": torch.randn(shape, generator=gen).bfloat16().cuda(),
        "cu_seqlens_q": torch.tensor([0, 512, 1512, 1513], dtype=torch.int32),
        "seq_lens": torch.tensor(lens, dtype=torch.int32),
        "block_tables": tables.cuda(),
        "scale": 1 / math.sqrt(128),
    }
    out = prefill_triton.paged_prefill_attention(**inputs)
    assert rel_err(out, inputs) < 1e-2


def test_ops_dispatch_and_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    launcher = prefill_triton.paged_prefill_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(prefill_triton, "paged_prefill_attention", counted)
    monkeypatch.delenv("TINYSERVE_REFERENCE_KERNELS", raising=False)
    inputs = make_case(CASES[1], "cuda")
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "auto")
    fast = ops.paged_prefill_attention(**inputs)
    assert len(calls) == 1
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "sdpa")
    slow = ops.paged_prefill_attention(**inputs)
    assert len(calls) == 1  # gather + SDPA: the launcher was not called
    assert rel_err(fast, inputs) < TOL["bfloat16"] and rel_err(slow, inputs) < TOL["bfloat16"]
    # cu_seqlens_q / seq_lens on the device work too (read back with a sync)
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "triton")
    on_dev = dict(
        inputs, cu_seqlens_q=inputs["cu_seqlens_q"].cuda(), seq_lens=inputs["seq_lens"].cuda()
    )
    assert torch.equal(ops.paged_prefill_attention(**on_dev), fast)
    fp32 = dict(inputs, query=inputs["query"].float(), k_cache=inputs["k_cache"].float(),
                v_cache=inputs["v_cache"].float())  # fmt: skip
    with pytest.raises(ValueError, match="does not support"):
        ops.paged_prefill_attention(**fp32)
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "auto")
    ops.paged_prefill_attention(**fp32)  # auto: fp32 falls back to the reference


def test_warm_up_compiles_for_supported_caches() -> None:
    k = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    assert ops.warm_up_prefill(k, k.clone(), 8)
    k32 = k.float()
    assert not ops.warm_up_prefill(k32, k32.clone(), 8)  # fp32: the reference path
