"""Per-step decode trace of the engine: where a batch's decode time goes, step by step, on a
fresh pool and on a pool already used (as a serving replica's always is).

For each mode (synchronous / asynchronous scheduling) x compaction (``between_steps``: the
trigger checked after every step, the CPU default; ``idle``: only when the replica is idle,
the CUDA default, so never inside a round; ``off``), one engine,
``--rounds`` rounds of ``--batch`` random prompts of ``--prompt-len`` tokens, ``--decode-tokens``
each (greedy, ignore_eos): every step is timed; a round's decode steps are those after the
prefill (``ceil(batch * prompt_len / max_num_batched_tokens)`` steps + 2). Per round: decode
step mean / p50 / max, decode tok/s (batch / mean step) and its fraction of the bandwidth
roofline (``engine_gpu_bench.roofline``, copy bandwidth measured in this run), compactions and
blocks moved, Python GC pauses (``gc.callbacks``), and the slowest steps with their phases
(``engine_phases.PhaseTimes``). Round 0 starts on an empty pool; later rounds find the blocks
the previous round freed, in the order it freed them.

    # GPU machine, repo root (random bf16 weights, no checkpoint written)
    PYTHONPATH=. python3 benchmarks/engine_step_trace.py --shape 1b --decode-tokens 128 \
        --json benchmarks/results/engine_step_trace_1b_h100.json
    PYTHONPATH=. python3 benchmarks/engine_step_trace.py --shape 8b --decode-tokens 64 ...
    # CPU, seconds: a 2-layer toy shape
    python benchmarks/engine_step_trace.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_gpu_bench import prompts_for, roofline
from benchmarks.engine_phases import PhaseTimes
from benchmarks.gpu_models import (
    SHAPES,
    copy_bandwidth,
    param_bytes_and_flops,
    random_checkpoint_dir,
    random_weights,
)
from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

BLOCK_SIZE = 16
# compaction settings compared: where the trigger is checked (CompactionConfig.when), or none
COMPACTION: dict[str, dict[str, object]] = {
    "between_steps": {"when": "between_steps"},
    "idle": {"when": "idle"},
    "off": {"enabled": False},
}
TOY = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


class GcPauses:
    """Collects Python GC pauses (generation, seconds) while installed."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((int(info["generation"]), time.perf_counter() - self._start))

    def take(self) -> list[tuple[int, float]]:
        out, self.pauses = self.pauses, []
        return out


def run_round(
    engine: LLMEngine, prompts: list[list[int]], decode_tokens: int, prefill_steps: int,
    tag: str, gcp: GcPauses,
) -> dict[str, Any]:  # fmt: skip
    """One round to completion; per-step wall times and phases (decode steps only)."""
    params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    phases = PhaseTimes(engine)
    phases.attach_stepper(engine)
    c0 = engine.compactor.stats
    steps: list[tuple[float, dict[str, float]]] = []
    gcp.take()
    phases.on = True
    while engine.has_unfinished_requests():
        phases.take()
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        steps.append((dt, {k: round(1e3 * v, 3) for k, v in phases.take().items()}))
    phases.on = False
    if engine.loaded.device.type == "cuda":
        torch.cuda.synchronize()
    c1 = engine.compactor.stats
    decode = steps[prefill_steps:]
    dts = [d for d, _ in decode]
    slowest = sorted(range(len(decode)), key=lambda i: -decode[i][0])[:5]
    return {
        "steps": len(steps),
        "decode_steps": len(dts),
        "decode_step_ms": {
            "mean": 1e3 * statistics.mean(dts),
            "p50": 1e3 * statistics.median(dts),
            "max": 1e3 * max(dts),
        },
        "compactions": c1.num_compactions_total - c0.num_compactions_total,
        "blocks_moved": c1.num_blocks_moved_total - c0.num_blocks_moved_total,
        "compaction_s": c1.seconds_total - c0.seconds_total,
        "gc_pauses_ms": [(g, round(1e3 * s, 2)) for g, s in gcp.take() if s >= 1e-3],
        "slowest_steps": [
            {"step": prefill_steps + i, "ms": round(1e3 * decode[i][0], 3), **decode[i][1]}
            for i in slowest
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", choices=["sync", "async"], default=["sync", "async"])
    ap.add_argument("--compaction", nargs="+", choices=list(COMPACTION), default=list(COMPACTION))
    ap.add_argument("--smoke", action="store_true", help="CPU, a 2-layer toy shape, short")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        shape, args.batch, args.prompt_len, args.decode_tokens, args.rounds = TOY, 8, 64, 24, 2
    else:
        shape = SHAPES[args.shape]
    if not cuda and not args.smoke:
        raise SystemExit("engine_step_trace: needs a CUDA GPU (or --smoke on CPU)")
    # NOTE: no roofline on CPU (the smoke run checks the code path only)
    bandwidth = copy_bandwidth() if cuda else None
    max_len = -(-(args.prompt_len + args.decode_tokens + 1) // BLOCK_SIZE) * BLOCK_SIZE
    budget = 8192
    prefill_steps = -(-args.batch * args.prompt_len // budget) + 2
    mean_ctx = args.prompt_len + args.decode_tokens / 2
    results: list[dict[str, Any]] = []
    gcp = GcPauses()
    gc.callbacks.append(gcp)
    seed = 0
    for mode in args.modes:
        for compaction in args.compaction:
            with random_weights():
                engine = LLMEngine(EngineConfig(
                    model=str(random_checkpoint_dir(shape, max_len)),
                    device="cuda" if cuda else "cpu",
                    dtype="bfloat16" if cuda else "float32",
                    num_blocks=args.batch * (max_len // BLOCK_SIZE) + 64,
                    block_size=BLOCK_SIZE,
                    max_num_seqs=args.batch,
                    max_num_batched_tokens=budget,
                    max_model_len=max_len,
                    async_scheduling=mode == "async",
                    compaction=COMPACTION[compaction],
                ))  # fmt: skip
            weight_bytes, _ = param_bytes_and_flops(engine.loaded.model)
            cfg = engine.loaded.arch
            kv_tok = 2 * cfg.num_hidden_layers * cfg.num_kv_heads * cfg.head_dim * 2
            roof_tok_s = (
                roofline(weight_bytes, cfg.hidden_size, args.batch, mean_ctx, bandwidth, kv_tok)[
                    "tok_s"
                ]
                if bandwidth
                else float("nan")
            )
            for rnd in range(args.rounds):
                seed += 1
                prompts = prompts_for(args.batch, args.prompt_len, seed, shape["vocab_size"])
                r = run_round(engine, prompts, args.decode_tokens, prefill_steps,
                              f"{mode}-{compaction}-{rnd}", gcp)  # fmt: skip
                tok_s = args.batch / (r["decode_step_ms"]["mean"] / 1e3)
                frac = tok_s / roof_tok_s if bandwidth else None
                r.update(mode=mode, compaction=compaction, round=rnd, decode_tok_s=tok_s,
                         roofline_tok_s=roof_tok_s if bandwidth else None,
                         fraction_of_roofline=frac)  # fmt: skip
                results.append(r)
                print(f"{mode:5s} compaction {compaction:13s} round {rnd}: step mean "
                      f"{r['decode_step_ms']['mean']:.2f} p50 {r['decode_step_ms']['p50']:.2f} "
                      f"max {r['decode_step_ms']['max']:.2f} ms, {tok_s:,.0f} tok/s = "
                      f"{frac or float('nan'):.2f} of roofline; compactions "
                      f"{r['compactions']} ({r['blocks_moved']} blocks, "
                      f"{1e3 * r['compaction_s']:.1f} ms); gc {r['gc_pauses_ms']}", flush=True)  # fmt: skip
            del engine
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    gc.callbacks.remove(gcp)
    head = (f"{'mode':>6} {'compaction':>13} {'round':>5} {'mean ms':>8} {'p50 ms':>7} "
            f"{'max ms':>7} {'tok/s':>9} {'of roof':>7} {'compactions':>11} {'moved':>6}")  # fmt: skip
    print("\nengine_step_trace", args.shape if not args.smoke else "toy",
          torch.cuda.get_device_name() if cuda else "cpu", f"batch {args.batch}")  # fmt: skip
    print(head)
    for r in results:
        s = r["decode_step_ms"]
        print(f"{r['mode']:>6} {r['compaction']:>13} {r['round']:>5} {s['mean']:8.2f} "
              f"{s['p50']:7.2f} {s['max']:7.2f} {r['decode_tok_s']:9,.0f} "
              f"{r['fraction_of_roofline'] or float('nan'):7.2f} {r['compactions']:11d} {r['blocks_moved']:6d}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "engine_step_trace",
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__,
            "machine": platform.platform(),
            "shape": "toy" if args.smoke else args.shape,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "decode_tokens": args.decode_tokens,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "rows": results,
        }, indent=1))  # fmt: skip
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
