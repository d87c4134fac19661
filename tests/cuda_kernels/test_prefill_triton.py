"""The Triton paged prefill kernel on CPU: Triton's interpreter runs the kernel source over
the varlen cases of prefill_cases.py against the fp32 gather + SDPA reference (skipped when
triton is absent), plus the launcher's input checks and the ops backend switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prefill_cases import CASES, INT64_TABLES, Case, make_case

from cuda_kernels import ops

pytest.importorskip("triton")

# NOTE: bf16 keeps 8 mantissa bits and P is rounded to the input dtype before P @ V (as in
# FlashAttention-2): errors of a few 1e-3 are the format's, not the kernel's.
TOL = {"float16": 2e-3, "bfloat16": 1.5e-2}


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, float]:
    """Relative errors of every case, computed in ONE subprocess: the interpreter must be
    switched on (TRITON_INTERPRET=1) before triton is first imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("prefill_cases.py")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return errs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_interpreted_kernel_matches_reference(
    interpreted_errors: dict[str, float], case: Case
) -> None:
    assert interpreted_errors[case.id] < TOL[case.dtype]


def test_interpreted_kernel_reads_int64_block_tables(interpreted_errors: dict[str, float]) -> None:
    assert interpreted_errors[INT64_TABLES] < TOL[CASES[0].dtype]


def test_launcher_rejects_bad_input() -> None:
    from cuda_kernels import prefill_triton

    inputs = make_case(CASES[1], "cpu")
    bad_len = dict(inputs, seq_lens=inputs["seq_lens"].clone())  # type: ignore[attr-defined]
    bad_len["seq_lens"][3] = 0  # type: ignore[index]
    with pytest.raises(ValueError, match="new tokens but seq_len"):
        prefill_triton.paged_prefill_attention(**bad_len)  # type: ignore[arg-type]
    short = dict(inputs, block_tables=inputs["block_tables"][:, :2])  # type: ignore[index]
    with pytest.raises(ValueError, match="exceeds the block tables"):
        prefill_triton.paged_prefill_attention(**short)  # type: ignore[arg-type]
    cu = inputs["cu_seqlens_q"].clone()  # type: ignore[attr-defined]
    cu[-1] += 1
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        prefill_triton.paged_prefill_attention(**dict(inputs, cu_seqlens_q=cu))  # type: ignore[arg-type]
    as_fp32 = dict(inputs, query=inputs["query"].float())  # type: ignore[attr-defined]
    assert not prefill_triton.supported(as_fp32["query"], inputs["k_cache"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported"):
        prefill_triton.paged_prefill_attention(**as_fp32)  # type: ignore[arg-type]


def test_step_metadata_upload_is_reused_by_value() -> None:
    """Layers of one step share one upload; a host buffer changed in place gets a new one."""
    from cuda_kernels import prefill_triton

    cu, lens = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([9, 2], dtype=torch.int32)
    dev = torch.device("cpu")
    first = prefill_triton._plan(cu.tolist(), lens.tolist(), 5, dev)
    assert prefill_triton._plan(cu.tolist(), lens.tolist(), 5, dev) is first
    assert first.meta.tolist() == [0, 3, 5, 9, 2] and first.max_q_len == 3
    lens[1] = 4  # in place, as a persistent host buffer would be
    second = prefill_triton._plan(cu.tolist(), lens.tolist(), 5, dev)
    assert second is not first and second.meta.tolist() == [0, 3, 5, 9, 4]
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        prefill_triton._plan(cu.tolist(), lens.tolist(), 6, dev)


def test_tile_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from cuda_kernels import prefill_triton

    assert prefill_triton.tile_config(128) == prefill_triton.DEFAULT_CONFIGS[128]
    monkeypatch.setenv(prefill_triton.CONFIG_ENV, "64,32,4,2")
    assert prefill_triton.tile_config(128) == prefill_triton.TileConfig(64, 32, 4, 2)
    monkeypatch.setenv(prefill_triton.CONFIG_ENV, "64,32")
    with pytest.raises(ValueError, match="BLOCK_M"):
        prefill_triton.tile_config(128)


def test_prefill_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINYSERVE_REFERENCE_KERNELS", raising=False)
    monkeypatch.delenv(ops.PREFILL_BACKEND_ENV, raising=False)
    assert ops.prefill_backend() == "triton"  # triton imports here (importorskip above)
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "sdpa")
    assert ops.prefill_backend() == "sdpa"
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "auto")
    monkeypatch.setenv("TINYSERVE_REFERENCE_KERNELS", "1")
    assert ops.prefill_backend() == "sdpa"
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "triton")
    assert ops.prefill_backend() == "triton"
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match="TINYSERVE_PREFILL_BACKEND"):
        ops.prefill_backend()


def test_warm_up_is_a_no_op_on_cpu() -> None:
    k = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    assert not ops.warm_up_prefill(k, k.clone(), 8)


def test_cpu_tensors_take_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, ops never reaches the Triton launcher, whatever the switch says."""
    from cuda_kernels import prefill_triton, reference

    def boom(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the Triton launcher must not run on CPU tensors")

    monkeypatch.setattr(prefill_triton, "paged_prefill_attention", boom)
    monkeypatch.setenv(ops.PREFILL_BACKEND_ENV, "triton")
    inputs = make_case(CASES[0], "cpu")
    out = ops.paged_prefill_attention(**inputs)  # type: ignore[arg-type]
    assert torch.equal(out, reference.paged_prefill_attention(**inputs))  # type: ignore[arg-type]
