"""CPU tests: the fused-kernel references equal transformers' Llama modules (the CPU path)."""

from __future__ import annotations

import pytest
import torch

from cuda_kernels import fused_reference, reference

llama = pytest.importorskip("transformers.models.llama.modeling_llama")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_residual_equals_hf_add_then_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((5, 64), generator=gen).to(dtype)
    res = torch.randn((5, 64), generator=gen).to(dtype)
    hf = llama.LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(64, generator=gen))
    out, h = fused_reference.rms_norm(x, hf.weight.detach(), 1e-6, res)
    assert torch.equal(h, res + x)
    assert torch.equal(out, hf(res + x).detach())
    out0, h0 = fused_reference.rms_norm(x, hf.weight.detach(), 1e-6)
    assert h0 is x and torch.equal(out0, hf(x).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_equals_hf_rotary_and_writes_slots(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    n, heads, kv_heads, d = 6, 4, 2, 16
    q = torch.randn((n, heads, d), generator=gen).to(dtype)
    k = torch.randn((n, kv_heads, d), generator=gen).to(dtype)
    v = torch.randn((n, kv_heads, d), generator=gen).to(dtype)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([torch.outer(torch.arange(64).float(), inv)] * 2, -1)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.tensor([0, 5, 9, 33, 34, 63])
    slots = torch.tensor([3, -1, 0, 7, 8, 15])
    kc = torch.full((2, 8, kv_heads, d), 9.0, dtype=dtype)
    vc = kc.clone()
    q_rot, k_rot = fused_reference.rope_and_cache(q, k, v, cos, sin, positions, kc, vc, slots)
    # transformers' layout: [batch, heads, seq, head_dim], cos/sin [batch, seq, head_dim]
    c = cos[positions].to(dtype)[None]
    s = sin[positions].to(dtype)[None]
    hq, hk = llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], c, s)
    assert torch.equal(q_rot, hq[0].transpose(0, 1))
    assert torch.equal(k_rot, hk[0].transpose(0, 1))
    ref_k, ref_v = torch.full_like(kc, 9.0), torch.full_like(vc, 9.0)
    reference.reshape_and_cache(hk[0].transpose(0, 1), v, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    assert torch.equal(kc.view(-1, kv_heads, d)[1], torch.full((kv_heads, d), 9.0, dtype=dtype))


def test_silu_and_mul_equals_hf_mlp_activation() -> None:
    gen = torch.Generator().manual_seed(2)
    gate_up = torch.randn((3, 2 * 24), generator=gen)
    out = fused_reference.silu_and_mul(gate_up)
    assert torch.equal(out, torch.nn.functional.silu(gate_up[:, :24]) * gate_up[:, 24:])
