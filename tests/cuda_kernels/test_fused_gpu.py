"""GPU tests: the fused layer kernels (fused_ops.cu) against their torch references."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from cuda_kernels import fused_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def fused() -> ModuleType:
    pytest.importorskip("cupy")
    from cuda_kernels import fused as mod

    return mod


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the 16-bit format's last place (same-sign values)."""
    ai = a.contiguous().view(torch.int16).int()
    bi = b.contiguous().view(torch.int16).int()
    return (ai - bi).abs()


def _check_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out.float()).all()
    # NOTE: rounding points are the reference's; only the fp32 sum order (RMSNorm) and expf
    # may move a value, by at most two units in the last place (fp16's finer grid).
    ulps = _ulps_apart(out, ref)
    assert int(ulps.max()) <= 2, f"max {int(ulps.max())} ulps"
    assert float((ulps == 0).float().mean()) > 0.98


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [576, 2048, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(
    fused: ModuleType, dtype: torch.dtype, hidden: int, with_residual: bool
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(hidden)
    n = 37
    # NOTE: x is a strided view (row stride > hidden), as the engine's slices can be.
    big = torch.randn((n, hidden + 64), device="cuda", generator=gen).to(dtype)
    x = big[:, :hidden]
    res = (
        torch.randn((n, hidden), device="cuda", generator=gen).to(dtype) if with_residual else None
    )
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=gen)).to(dtype)
    ref_out, ref_res = fused_reference.rms_norm(
        x.clone(), w, 1e-5, None if res is None else res.clone()
    )
    assert fused.supported_rms_norm(x, res)
    out, new_res = fused.rms_norm(x, w, 1e-5, res)
    _check_close(out, ref_out)
    assert torch.equal(new_res, ref_res)  # the add rounds once, exactly as torch does
    if with_residual:
        assert out.data_ptr() == x.data_ptr() and new_res.data_ptr() == res.data_ptr()
    else:
        assert new_res.data_ptr() == x.data_ptr() and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 64), (32, 8, 128), (9, 3, 64)]
)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_rope_and_cache_matches_reference(
    fused: ModuleType,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    slot_dtype: torch.dtype,
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(num_heads * head_dim)
    n, num_blocks, block_size, max_pos = 50, 16, 16, 4096
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn((n, q_size + 2 * kv_size), device="cuda", generator=gen).to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(n, num_heads, head_dim)
    k = k.view(n, num_kv_heads, head_dim)
    v = v.view(n, num_kv_heads, head_dim)
    inv = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().cuda(), emb.sin().cuda()
    positions = torch.randint(0, max_pos, (n,), device="cuda", generator=gen)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:n]
    slots[::7] = -1  # padding rows: no cache write
    slots = slots.to(slot_dtype)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    poison = torch.full(shape, 7.0, device="cuda", dtype=dtype)
    kc_ref, vc_ref = poison.clone(), poison.clone()
    q_ref, k_ref = fused_reference.rope_and_cache(
        q.clone(), k.clone(), v.clone(), cos, sin, positions, kc_ref, vc_ref, slots
    )
    kc, vc = poison.clone(), poison.clone()
    assert fused.supported_rope(q, kc)
    q_out, k_out = fused.rope_and_cache(q, k, v, cos, sin, positions, kc, vc, slots)
    assert q_out.data_ptr() == qkv.data_ptr()  # rotated in place
    assert torch.equal(q_out, q_ref)
    assert torch.equal(k_out, k_ref)
    assert torch.equal(kc, kc_ref)
    assert torch.equal(vc, vc_ref)
    written = int((slots >= 0).sum())
    untouched = (kc.view(-1, num_kv_heads, head_dim) == 7.0).all(-1).all(-1)
    assert int((~untouched).sum()) == written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("intermediate", [1536, 8192, 14336])
def test_silu_and_mul_matches_reference(
    fused: ModuleType, dtype: torch.dtype, intermediate: int
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(intermediate)
    gate_up = (3 * torch.randn((19, 2 * intermediate), device="cuda", generator=gen)).to(dtype)
    ref = fused_reference.silu_and_mul(gate_up)
    out = fused.silu_and_mul(gate_up)
    _check_close(out, ref)


def test_fused_kernels_reject_bad_input(fused: ModuleType) -> None:
    x = torch.randn((4, 64), device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, torch.ones(32, device="cuda", dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        fused.rms_norm(x, torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-5, x[:2])
    q = torch.randn((4, 4, 64), device="cuda", dtype=torch.bfloat16)
    k = torch.randn((4, 2, 64), device="cuda", dtype=torch.bfloat16)
    cache = torch.zeros((2, 16, 2, 64), device="cuda", dtype=torch.bfloat16)
    table = torch.zeros((16, 64), device="cuda")
    pos = torch.zeros(4, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="positions"):
        fused.rope_and_cache(q, k, k.clone(), table, table, pos.int(), cache, cache.clone(), pos)
    with pytest.raises(ValueError, match="do not match"):
        fused.rope_and_cache(q, k, k[:2].clone(), table, table, pos, cache, cache.clone(), pos)
