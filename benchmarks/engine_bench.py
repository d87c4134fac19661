"""Engine benchmark: the TinyServe replica engine vs transformers ``generate`` (same run).

Two measurements, SmolLM2-135M-Instruct (the embedded default model) on CPU, float32:

1. Throughput: N requests with mixed prompt lengths and mixed max_tokens (ignore_eos, greedy).
   - ours: all requests added at once to LLMEngine, stepped to completion (continuous
     batching, chunked prefill, paged KV through cuda_kernels' torch reference on CPU);
   - baseline: ONE ``model.generate`` call on the left-padded batch with
     max_new_tokens = max(max_tokens) (a static batch runs until its longest member ends).
   Both are credited with the same useful tokens (sum of max_tokens), so the ratio of output
   tokens/s is baseline_time / our_time. Target: >= 2x.
2. TTFT with a cached prefix: a request whose first ``--prefix-len`` tokens are in the pool's
   prefix cache vs the same-shaped cold request (fresh random prefix). Target: <= 0.3x.

Run:  python benchmarks/engine_bench.py --json results/engine_bench.json
Quote only the ratios (this machine is shared; absolute times are noise-prone).

``--compare-async``: instead, the throughput workload on ONE engine in three step loops,
order rotated per repeat, the prefix cache dropped before each run: synchronous,
asynchronous scheduling with the forward on a worker thread (overlapping the host's Python),
and asynchronous with the forward inline (the CPU default: no overlap, the bookkeeping's own
cost). Ratios are
tokens/s over the synchronous run of the same repeat.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

FIRST_PLAIN_TOKEN = 100  # NOTE: SmolLM2's special tokens sit below this id.


def make_workload(
    num_requests: int,
    min_prompt: int,
    max_prompt: int,
    min_out: int,
    max_out: int,
    seed: int,
    vocab: int,
) -> list[tuple[list[int], int]]:
    """(prompt_token_ids, max_tokens) pairs: lengths spread evenly over the ranges, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    n = num_requests
    prompt_lens = [min_prompt + (max_prompt - min_prompt) * i // max(n - 1, 1) for i in range(n)]
    out_lens = [min_out + (max_out - min_out) * i // max(n - 1, 1) for i in range(n)]
    order = torch.randperm(n, generator=gen).tolist()
    out_lens = [out_lens[i] for i in order]
    return [
        (torch.randint(FIRST_PLAIN_TOKEN, vocab, (p,), generator=gen).tolist(), o)
        for p, o in zip(prompt_lens, out_lens, strict=True)
    ]


def run_ours(engine: LLMEngine, workload: list[tuple[list[int], int]]) -> dict[str, Any]:
    start = time.perf_counter()
    steps0 = engine.num_steps
    for i, (prompt, max_tokens) in enumerate(workload):
        engine.add_request(
            f"tp-{start}-{i}",
            prompt,
            SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )
    produced = 0
    ttfts: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced += len(out.new_token_ids)
            if out.finished and out.metrics.ttft_s is not None:
                ttfts.append(out.metrics.ttft_s)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "output_tokens": produced,
        "steps": engine.num_steps - steps0,
        "median_ttft_s": statistics.median(ttfts),
    }


ASYNC_MODES = ("sync", "async_worker", "async_inline")


def set_mode(engine: LLMEngine, mode: str) -> None:
    """Put ``engine`` in one of ASYNC_MODES (idle engine; drops its prefix cache)."""
    from replicas.async_scheduling import AsyncStepper

    engine.set_async_scheduling(mode != "sync")
    if engine._stepper is not None:
        engine._stepper.close()
        engine._stepper = AsyncStepper(engine, worker_thread=mode == "async_worker")
    assert engine.kv.reset_prefix_cache(), "blocks still in use"


def compare_async(engine: LLMEngine, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Throughput of the step loops of ASYNC_MODES on the same workloads (module docstring)."""
    rows: list[dict[str, Any]] = []
    for r in range(args.repeats):
        workload = make_workload(
            args.num_requests, *args.prompt_len, *args.max_tokens, seed=args.seed + r, vocab=vocab
        )
        row: dict[str, Any] = {"repeat": r}
        order = ASYNC_MODES[r % 3 :] + ASYNC_MODES[: r % 3]
        for mode in order:
            set_mode(engine, mode)
            row[mode] = run_ours(engine, workload)
        for mode in ASYNC_MODES[1:]:
            row[f"{mode}_over_sync"] = row["sync"]["seconds"] / row[mode]["seconds"]
        print(f"  repeat {r}: " + "  ".join(f"{m} {row[m]['seconds']:.2f}s" for m in ASYNC_MODES),
              flush=True)  # fmt: skip
        rows.append(row)
    set_mode(engine, "sync")
    medians = {
        f"median_{m}_over_sync": statistics.median(row[f"{m}_over_sync"] for row in rows)
        for m in ASYNC_MODES[1:]
    }
    return {"repeats": rows, **medians}


def run_hf(model: Any, workload: list[tuple[list[int], int]], pad_id: int) -> dict[str, Any]:
    max_len = max(len(p) for p, _ in workload)
    max_new = max(o for _, o in workload)
    ids = torch.full((len(workload), max_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(workload):
        ids[i, max_len - len(p) :] = torch.tensor(p)
        mask[i, max_len - len(p) :] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
        )
    seconds = time.perf_counter() - start
    useful = sum(o for _, o in workload)
    return {
        "seconds": seconds,
        "output_tokens": useful,
        "generated_incl_padding": int(out.shape[0] * max_new),
    }


def ttft_once(engine: LLMEngine, prompt: list[int], tag: str) -> tuple[float, int]:
    engine.add_request(tag, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.metrics.ttft_s is not None
                return out.metrics.ttft_s, out.num_cached_tokens
    raise RuntimeError("request did not finish")


def bench_ttft(
    engine: LLMEngine, prefix_len: int, suffix_len: int, repeats: int, vocab: int, seed: int
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(FIRST_PLAIN_TOKEN, vocab, (n,), generator=gen).tolist()

    cold: list[float] = []
    warm: list[float] = []
    cached_tokens: list[int] = []
    for r in range(repeats):
        prefix = rand(prefix_len)
        t_cold, c0 = ttft_once(engine, prefix + rand(suffix_len), f"cold-{seed}-{r}")
        assert c0 == 0, "cold request unexpectedly hit the cache"
        t_warm, c1 = ttft_once(engine, prefix + rand(suffix_len), f"warm-{seed}-{r}")
        cold.append(t_cold)
        warm.append(t_warm)
        cached_tokens.append(c1)
    return {
        "cold_ttft_s": cold,
        "warm_ttft_s": warm,
        "warm_num_cached_tokens": cached_tokens,
        "median_cold_ttft_s": statistics.median(cold),
        "median_warm_ttft_s": statistics.median(warm),
        "ratio_warm_over_cold": statistics.median(w / c for w, c in zip(warm, cold, strict=True)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="default")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--max-tokens", type=int, nargs=2, default=(8, 96), metavar=("MIN", "MAX"))
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="throughput and TTFT repetitions")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--compare-async", action="store_true",
                    help="sync vs async scheduling step loops instead (module docstring)")  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_async:
        main_compare_async(args)
        return

    from transformers import AutoModelForCausalLM

    engine = _engine(args)
    vocab = engine.vocab_size
    hf = AutoModelForCausalLM.from_pretrained(
        str(engine.loaded.model_dir), dtype=torch.float32
    ).eval()
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer is not None else 0
    pad_id = 0 if pad_id is None else int(pad_id)

    # Warm-up both paths (allocator, first-call overheads).
    warm_load = make_workload(4, 8, 32, 2, 4, seed=999, vocab=vocab)
    run_ours(engine, warm_load)
    run_hf(hf, warm_load, pad_id)

    rows: list[dict[str, Any]] = []
    for r in range(args.repeats):
        workload = make_workload(
            args.num_requests, *args.prompt_len, *args.max_tokens, seed=args.seed + r, vocab=vocab
        )
        # NOTE: alternate the order so drifting load on a shared machine hits both sides.
        if r % 2 == 0:
            ours = run_ours(engine, workload)
            base = run_hf(hf, workload, pad_id)
        else:
            base = run_hf(hf, workload, pad_id)
            ours = run_ours(engine, workload)
        assert ours["output_tokens"] == base["output_tokens"]
        rows.append(
            {
                "repeat": r,
                "ours": ours,
                "transformers": base,
                "ratio": base["seconds"] / ours["seconds"],
            }
        )
        print(
            f"  throughput repeat {r}: ours {ours['seconds']:.1f}s  transformers {base['seconds']:.1f}s",
            flush=True,
        )
    ttft = bench_ttft(
        engine, args.prefix_len, args.suffix_len, args.repeats, vocab, seed=args.seed + 100
    )

    tp_ratio = statistics.median(row["ratio"] for row in rows)
    ours_tps = statistics.median(
        row["ours"]["output_tokens"] / row["ours"]["seconds"] for row in rows
    )
    hf_tps = statistics.median(
        row["transformers"]["output_tokens"] / row["transformers"]["seconds"] for row in rows
    )
    result = {
        "benchmark": "engine_bench",
        "model": args.model,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "engine_load_seconds": engine.loaded.load_seconds,
        "machine": platform.platform(),
        "args": {
            k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
        },
        "throughput": {
            "repeats": rows,
            "median_ours_output_tokens_per_s": ours_tps,
            "median_transformers_output_tokens_per_s": hf_tps,
            "median_ratio_ours_over_transformers": tp_ratio,
            "target": ">= 2.0",
            "met": tp_ratio >= 2.0,
        },
        "cached_prefix_ttft": {
            **ttft,
            "prefix_len": args.prefix_len,
            "target": "<= 0.3",
            "met": ttft["ratio_warm_over_cold"] <= 0.3,
        },
        "pool_stats": {
            k: getattr(engine.stats(), k)
            for k in (
                "num_blocks",
                "prefix_hit_tokens",
                "prefix_query_tokens",
                "num_evicted_blocks",
            )
        },
    }
    print()
    print(
        f"engine_bench  model={args.model}  cpu threads={torch.get_num_threads()}  requests={args.num_requests}  repeats={args.repeats}"
    )
    print(f"{'metric':<44}{'ours':>12}{'baseline':>12}{'ratio':>9}{'target':>9}")
    print(
        f"{'output tokens/s (vs transformers generate)':<44}{ours_tps:>12.1f}{hf_tps:>12.1f}{tp_ratio:>9.2f}{'>= 2.0':>9}"
    )
    print(
        f"{'TTFT s, ' + str(args.prefix_len) + '-token cached prefix vs cold':<44}"
        f"{ttft['median_warm_ttft_s']:>12.3f}{ttft['median_cold_ttft_s']:>12.3f}"
        f"{ttft['ratio_warm_over_cold']:>9.3f}{'<= 0.3':>9}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


def _engine(args: argparse.Namespace) -> LLMEngine:
    """The engine every mode of this benchmark measures."""
    return LLMEngine(
        EngineConfig(
            model=args.model,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=max(64, args.num_requests),
            seed=args.seed,
        )
    )


def main_compare_async(args: argparse.Namespace) -> None:
    engine = _engine(args)
    vocab = engine.vocab_size
    for mode in ASYNC_MODES:  # NOTE: warm-up of every loop (the worker thread starts here)
        set_mode(engine, mode)
        run_ours(engine, make_workload(4, 8, 32, 2, 4, seed=999, vocab=vocab))
    res = compare_async(engine, args, vocab)
    result = {
        "benchmark": "engine_bench_async",
        "model": args.model,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "args": {
            k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
        },
        **res,
    }
    print()
    print(f"engine_bench --compare-async  model={args.model}  cpu threads="
          f"{torch.get_num_threads()}  requests={args.num_requests}  repeats={args.repeats}")  # fmt: skip
    print(f"{'step loop':<16}{'median tok/s':>14}{'median ratio vs sync':>22}")
    for m in ASYNC_MODES:
        tps = statistics.median(
            row[m]["output_tokens"] / row[m]["seconds"] for row in res["repeats"]
        )
        ratio = 1.0 if m == "sync" else res[f"median_{m}_over_sync"]
        print(f"{m:<16}{tps:>14.1f}{ratio:>22.3f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
