"""Engine GPU benchmark, end to end: prefill of one long chunk against the matmul peak, and
the engine alone serving N concurrent requests against the hardware limit.

Model: a random-weight Llama shape (benchmarks.gpu_models: ``--shape 1b`` or ``8b``), bf16,
CUDA graphs on, block_size 16, weights filled in place (no checkpoint on disk).

- prefill: one request of --prefill-len prompt tokens (one step, one chunk: the token budget
  is set to it); TFLOP/s = (2 * linear params * tokens + causal attention 2 * n^2 * heads *
  head_dim per layer) / step time, as a fraction of an 8192^3 bf16 matmul in the same run.
- e2e: for each concurrency C, C fresh random prompts of --prompt-len tokens added at once,
  greedy, ignore_eos, --output-len tokens each, stepped to completion (scheduler, sampler and
  outputs included). The hardware limit is the time the GPU needs at its two ceilings: every
  prompt's FLOPs at the matmul peak, plus --output-len decode steps each reading the weights
  once and every sequence's K/V once at copy bandwidth. output tok/s / limit tok/s is the
  fraction the issue targets (>= 0.5).

Run (GPU machine, repo root):
    PYTHONPATH=. python3 benchmarks/engine_gpu_e2e.py --shape 1b --json benchmarks/results/engine_e2e_1b_h100.json
``--smoke``: 2 layers, small sizes.
``--async-scheduling``: each concurrency is also run with EngineConfig.async_scheduling
switched on (same engine, right after the synchronous run, same prompts): ``async`` in each
row, and ``async_over_sync`` (output tok/s ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_models import (
    SHAPES,
    copy_bandwidth,
    matmul_peak,
    param_bytes_and_flops,
    random_checkpoint_dir,
    random_weights,
)
from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

BLOCK_SIZE = 16


def _prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def _attn_flops(tokens: int, ctx_start: int, layers: int, heads: int, head_dim: int) -> float:
    """QK^T and PV FLOPs of a causal chunk of ``tokens`` after ``ctx_start`` cached ones."""
    pairs = tokens * ctx_start + tokens * (tokens + 1) / 2
    return 4.0 * pairs * heads * head_dim * layers


def run_requests(
    engine: LLMEngine, prompts: list[list[int]], output_len: int, tag: str
) -> dict[str, Any]:
    """Add every prompt at once, step to completion; wall time, TTFT and TPOT per request."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    produced = 0
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            produced += len(o.new_token_ids)
            first.setdefault(o.request_id, now)
            last[o.request_id] = now
    wall = time.perf_counter() - t0
    ttft = sorted(first[r] - t0 for r in first)
    tpot = sorted((last[r] - first[r]) / max(output_len - 1, 1) for r in first)
    return {
        "wall_s": wall,
        "steps": steps,
        "output_tokens": produced,
        "output_tok_s": produced / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "tpot_p50_s": statistics.median(tpot),
    }


def hardware_limit(
    c: int, prompt_len: int, output_len: int, shape: dict[str, int], weight_bytes: int,
    linear_params: int, kv_bytes_per_token: int, peak: float, bandwidth: float,
) -> dict[str, float]:  # fmt: skip
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    layers, heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    prefill_flops = c * (
        2.0 * linear_params * prompt_len + _attn_flops(prompt_len, 0, layers, heads, head_dim)
    )
    t_prefill = prefill_flops / peak
    # NOTE: decode step s reads the weights once (plus c embedding rows, ignored) and the K/V of
    # c sequences at context prompt_len + s.
    kv = sum(c * (prompt_len + s) * kv_bytes_per_token for s in range(1, output_len))
    t_decode = ((output_len - 1) * weight_bytes + kv) / bandwidth
    total = t_prefill + t_decode
    return {
        "prefill_s": t_prefill,
        "decode_s": t_decode,
        "output_tok_s": c * output_len / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="2 layers, tiny sizes")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="also run each concurrency with async scheduling")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.smoke:
        shape["num_hidden_layers"] = 2
        args.concurrency, args.prompt_len, args.output_len, args.prefill_len = [1, 4], 64, 8, 256
    dev_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    peak = matmul_peak()
    print(f"{dev_name}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s",
          flush=True)  # fmt: skip
    max_c = max(args.concurrency)
    max_len = -(-(max(args.prompt_len + args.output_len, args.prefill_len) + 1) // BLOCK_SIZE)
    max_len *= BLOCK_SIZE
    per_req = -(-(args.prompt_len + args.output_len) // BLOCK_SIZE)
    num_blocks = max(max_c * per_req, max_len // BLOCK_SIZE) + 64
    t_load = time.perf_counter()
    with random_weights():
        engine = LLMEngine(
            EngineConfig(
                model=str(random_checkpoint_dir(shape, max_len)),
                device="cuda",
                dtype="bfloat16",
                num_blocks=num_blocks,
                block_size=BLOCK_SIZE,
                max_num_seqs=max_c,
                max_num_batched_tokens=max(args.prefill_len, args.prompt_len),
                max_model_len=max_len,
                enable_prefix_caching=False,
                cuda_graphs=True,
                async_scheduling=False,  # NOTE: the synchronous loop is the baseline mode
            )
        )
    print(f"engine up in {time.perf_counter() - t_load:.1f} s", flush=True)
    cfg = engine.loaded.arch
    weight_bytes, linear_params = param_bytes_and_flops(engine.loaded.model)
    kv_tok = 2 * cfg.num_hidden_layers * cfg.num_kv_heads * cfg.head_dim * 2
    vocab = cfg.vocab_size

    # -- prefill of one long chunk ---------------------------------------------------------
    for rep in range(2):  # NOTE: the first is the warm-up (allocator, cuBLAS heuristics)
        engine.add_request(f"prefill-{rep}", _prompts(1, args.prefill_len, rep, vocab)[0],
                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))  # fmt: skip
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        prefill_s = time.perf_counter() - t0
    flops = 2.0 * linear_params * args.prefill_len + _attn_flops(
        args.prefill_len, 0, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    )
    prefill = {
        "tokens": args.prefill_len,
        "step_s": prefill_s,
        "tflop_s": flops / prefill_s / 1e12,
        "fraction_of_matmul_peak": flops / prefill_s / peak,
    }
    print(f"prefill {args.prefill_len}: {1e3 * prefill_s:.1f} ms, {prefill['tflop_s']:.0f} "
          f"TFLOP/s = {prefill['fraction_of_matmul_peak']:.2f} of peak", flush=True)  # fmt: skip

    # -- end to end ------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(args.concurrency):
        # NOTE: a warm-up of the same shape captures this run's CUDA graphs first.
        warm = _prompts(c, args.prompt_len, 1000 + i, vocab)
        run_requests(engine, warm, args.output_len, f"w{c}")
        prompts = _prompts(c, args.prompt_len, 2000 + i, vocab)
        res = run_requests(engine, prompts, args.output_len, f"c{c}")
        if args.async_scheduling:
            engine.set_async_scheduling(True)
            # NOTE: the asynchronous loop gets its own warm-up: without it the first
            # asynchronous run (c=1) read a TTFT of 32-54 ms against 10-15 synchronous (run5,
            # run6), a one-time cost no later concurrency showed.
            run_requests(engine, warm, args.output_len, f"wa{c}")
            res["async"] = run_requests(engine, prompts, args.output_len, f"a{c}")
            engine.set_async_scheduling(False)
            res["async_over_sync"] = res["async"]["output_tok_s"] / res["output_tok_s"]
            print(f"c{c} async: {res['async']['output_tok_s']:.0f} tok/s = "
                  f"{res['async_over_sync']:.2f}x sync", flush=True)  # fmt: skip
        limit = hardware_limit(c, args.prompt_len, args.output_len, shape, weight_bytes,
                               linear_params, kv_tok, peak, bandwidth)  # fmt: skip
        res.update(concurrency=c, limit=limit,
                   fraction_of_limit=res["output_tok_s"] / limit["output_tok_s"])  # fmt: skip
        rows.append(res)
        print(f"c{c}: {res['output_tok_s']:.0f} tok/s = {res['fraction_of_limit']:.2f} of the "
              f"limit {limit['output_tok_s']:.0f}", flush=True)  # fmt: skip
    result = {
        "benchmark": "engine_gpu_e2e",
        "gpu": dev_name,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "shape": args.shape,
        "model": {**shape, "head_dim": cfg.head_dim, "dtype": "bfloat16", "weights": "random"},
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_peak_flop_s": peak,
        "weight_bytes": weight_bytes,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "prefill": prefill,
        "async_scheduling_measured": args.async_scheduling,
        "rows": rows,
        # NOTE: the replica's step-time fit after this run's real steps (replicas/step_fit.py):
        # what a GPU replica would report to the selection service.
        "rate_meter": {
            "num_steps": engine.rates.num_steps,
            "coefficients": dataclasses.asdict(engine.rates.coefficients()),
            "rates": dataclasses.asdict(engine.rates.rates()),
        },
        "targets": {
            "prefill_fraction_of_matmul_peak": 0.6,
            "e2e_fraction_of_limit": 0.5,
        },
    }
    print()
    print(f"engine_gpu_e2e {args.shape}  {dev_name}  copy {bandwidth / 1e12:.2f} TB/s  matmul "
          f"{peak / 1e12:.0f} TFLOP/s  prefill {args.prefill_len}: "
          f"{prefill['fraction_of_matmul_peak']:.2f} of peak (target 0.60)")  # fmt: skip
    hdr = ("conc", "tok/s", "limit tok/s", "of limit", "TTFT p50 ms", "TTFT p99 ms", "TPOT ms")
    print("".join(f"{h:>13}" for h in hdr))
    for r in rows:
        vals = (r["concurrency"], r["output_tok_s"], r["limit"]["output_tok_s"],
                r["fraction_of_limit"], 1e3 * r["ttft_p50_s"], 1e3 * r["ttft_p99_s"],
                1e3 * r["tpot_p50_s"])  # fmt: skip
        print("".join(f"{v:>13.2f}" if k == 3 else f"{v:>13.0f}" for k, v in enumerate(vals)))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
