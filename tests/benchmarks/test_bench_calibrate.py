"""Step-time calibration: the fit recovers known coefficients; the CLI measures a tiny random
engine on CPU and writes a calibration the simulator loads."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.sim.calibration import load_calibration
from benchmarks.sim.fit import (
    COEFFS,
    StepShape,
    fit_step_times,
    nnls_small,
    predict,
    residual_report,
)

TRUE = {"base_s": 2e-3, "per_seq_s": 1e-4, "weights_read_s": 6e-3, "linear_per_token_s": 3e-5,
        "attn_per_pair_s": 2e-9, "kv_read_per_token_s": 5e-8}  # knee at 200 tokens


def grid_shapes() -> list[StepShape]:
    """A calibrate.py-like grid: prefill chunks x cached context, decode B x L, mixed."""
    shapes = [StepShape(c, 1, c * (x + c / 2), 0, "prefill")
              for c, x in itertools.product((16, 64, 256, 1024, 4096), (0, 2048, 8192))]
    shapes += [StepShape(b, b, 0.0, b * n, "decode")
               for b, n in itertools.product((1, 8, 32, 128, 256), (256, 2048, 8192))]
    shapes += [StepShape(b + c, b + 1, c * (x + c / 2), b * n, "mixed")
               for b, n, c, x in ((16, 2048, 512, 0), (64, 512, 2048, 4096), (128, 8192, 256, 0))]
    return shapes


def test_fit_recovers_known_coefficients_exactly() -> None:
    shapes = grid_shapes()
    times = [predict(TRUE, s) for s in shapes]
    fit = fit_step_times(shapes, times)
    for k in COEFFS:
        assert fit.coeffs[k] == pytest.approx(TRUE[k], rel=0.02), k
    assert fit.knee_tokens == pytest.approx(200, rel=0.02)
    assert fit.rms_rel_error < 1e-3


def test_fit_with_noise_stays_close_and_reports_residuals() -> None:
    shapes = grid_shapes()
    rng = np.random.default_rng(0)
    times = [predict(TRUE, s) * float(rng.uniform(0.97, 1.03)) for s in shapes]
    fit = fit_step_times(shapes, times)
    for k in ("linear_per_token_s", "attn_per_pair_s", "kv_read_per_token_s", "weights_read_s"):
        assert fit.coeffs[k] == pytest.approx(TRUE[k], rel=0.15), k
    assert all(v >= 0 for v in fit.coeffs.values())
    assert max(abs(e) for e in fit.rel_errors) < 0.08
    rep = residual_report(shapes, fit.rel_errors)
    assert set(rep) == {"prefill", "decode", "mixed", "all"}
    assert rep["all"]["n"] == len(shapes)
    assert rep["all"]["max_abs_rel_error"] == pytest.approx(max(abs(e) for e in fit.rel_errors))


def test_purely_linear_fit_and_bad_input() -> None:
    coeffs = dict(TRUE, weights_read_s=0.0)
    shapes = grid_shapes()
    fit = fit_step_times(shapes, [predict(coeffs, s) for s in shapes], fit_knee=False)
    assert fit.coeffs["weights_read_s"] == 0.0
    assert fit.coeffs["linear_per_token_s"] == pytest.approx(TRUE["linear_per_token_s"], rel=1e-6)
    with pytest.raises(ValueError, match="at least 6"):
        fit_step_times(shapes[:3], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        fit_step_times(shapes, [0.0] * len(shapes))


def test_nnls_small_clamps_a_negative_unconstrained_solution() -> None:
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = np.array([3.0, 2.0, 1.0])  # unconstrained: intercept 4, slope -1
    x = nnls_small(a, b)
    assert x[1] == 0.0 and x[0] == pytest.approx(2.0)  # the best intercept-only fit
    assert np.allclose(nnls_small(a, a @ np.array([0.5, 2.0])), [0.5, 2.0])


def _tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=1, bos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).float().eval().save_pretrained(str(path))
    return path


def test_cli_measures_a_tiny_engine_and_writes_a_loadable_calibration(tmp_path: Path) -> None:
    from benchmarks.calibrate import GRIDS, main

    model = _tiny_llama(tmp_path / "ckpt")
    out = tmp_path / "cal.json"
    assert main(["--device", "cpu", "--model", str(model), "--smoke", "--repeats", "2",
                 "--warmup", "1", "--num-blocks", "256", "--num-threads", "1",
                 "--out", str(out)]) == 0
    m = load_calibration(out)
    assert m.provenance.startswith("MEASURED") and "calibrate" in m.provenance
    assert m.gpu.startswith("CPU")
    assert '"hidden_size": 64' in m.model and '"num_hidden_layers": 2' in m.model
    assert m.kv_capacity_tokens == 256 * 16 and m.kv_blocks(16) == 256
    assert m.max_num_batched_tokens == 512
    data = json.loads(out.read_text())
    grid = GRIDS["smoke"]
    rows = data["measurements"]
    assert len(rows) == len(grid["prefill"]) + len(grid["decode"]) + len(grid["mixed"])
    # the measured shapes are the grid's (read back from the engine's scheduler)
    prefill = {(r["shape"]["num_tokens"], r["shape"]["attn_pairs"]) for r in rows
               if r["kind"] == "prefill"}
    assert prefill == {(c, c * (x + c / 2)) for c, x in grid["prefill"]}
    decode = {(r["shape"]["num_seqs"], r["shape"]["num_tokens"]) for r in rows
              if r["kind"] == "decode"}
    assert decode == {(b, b) for b, _ in grid["decode"]}
    mixed = [r["shape"] for r in rows if r["kind"] == "mixed"]
    assert sorted((s["num_seqs"], s["num_tokens"]) for s in mixed) == sorted(
        (b + 1, b + c) for b, _, c, _ in grid["mixed"])
    assert all(r["seconds"] > 0 and len(r["repeats_s"]) == 2 for r in rows)
    assert all(data[k] >= 0 for k in COEFFS)
    assert set(data["fit"]["residuals"]) == {"prefill", "decode", "mixed", "all"}
    assert data["engine_config"]["num_blocks"] == 256
    # the fitted model reproduces its own predictions through StepTimeModel
    r0 = rows[0]["shape"]
    assert m.step_time(r0["num_tokens"], r0["num_seqs"], r0["attn_pairs"],
                       r0["decode_ctx_tokens"]) == pytest.approx(r0["predicted_s"])
