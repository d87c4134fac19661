"""What the engine core's hand-over adds to one request at concurrency 1: thread vs process core.

A tiny random checkpoint (``benchmarks.tiny_model``: a step is ~1-3 ms on CPU) so the hops,
not the model, dominate. Every variant is built once; requests then go to the variants in turn
(A B A B ...), one at a time, so every variant sees the same machine load. Per request, with
the engine's own stamps (``RequestOutput.trace``, wall clock of one host):

    submit      caller's generate() -> the core accepted it        (engine_add - t_submit)
    engine_ttft the core accepted it -> its first token sampled     (the engine's own TTFT)
    deliver     first token sampled -> it reached the caller's loop (t_first - engine_first)
    ttft        generate() -> first output on the caller's loop     (what a client sees)
    last        last token sampled -> the last output on the loop
    tpot_gap    caller-side mean gap between outputs minus the engine's TPOT

    python benchmarks/core_latency.py --requests 60 --json benchmarks/results/core_latency_cpu.json
    python benchmarks/core_latency.py --variants thread process process_async

Prints a table and writes JSON (medians and p90 per variant, plus every request's figures).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replicas.config import EngineConfig
from replicas.engine import AsyncLLMEngine, SamplingParams

VARIANTS: dict[str, dict[str, Any]] = {
    "thread": {"engine_process": False, "async_scheduling": False},
    "process": {"engine_process": True, "async_scheduling": False},
    "thread_async": {"engine_process": False, "async_scheduling": True},
    "process_async": {"engine_process": True, "async_scheduling": True},
}
FIELDS = ("ttft", "submit", "engine_ttft", "deliver", "last", "tpot_gap")


@dataclass(slots=True)
class Sample:
    """One request's figures, milliseconds."""

    ttft: float
    submit: float
    engine_ttft: float
    deliver: float
    last: float
    tpot_gap: float


async def one_request(
    engine: AsyncLLMEngine, rid: str, prompt: list[int], max_tokens: int
) -> Sample:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    arrivals: list[float] = []
    t_submit = time.time()
    final = None
    async for out in engine.generate(rid, prompt, params):
        arrivals.append(time.time())
        final = out
    assert final is not None and final.trace is not None and final.finished
    tr, m = final.trace, final.metrics
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    tpot = m.tpot_s or 0.0
    return Sample(
        ttft=1e3 * (arrivals[0] - t_submit),
        submit=1e3 * (tr.engine_add - t_submit),
        engine_ttft=1e3 * (tr.engine_first_token - tr.engine_add),
        deliver=1e3 * (arrivals[0] - tr.engine_first_token),
        last=1e3 * (arrivals[-1] - tr.engine_finish),
        tpot_gap=1e3 * ((statistics.mean(gaps) if gaps else 0.0) - tpot),
    )


def summarize(samples: list[Sample]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for f in FIELDS:
        xs = sorted(getattr(s, f) for s in samples)
        out[f] = {
            "p50": statistics.median(xs),
            "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))],
            "mean": statistics.fmean(xs),
        }
    return out


async def run(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    engines: dict[str, AsyncLLMEngine] = {}
    for name in args.variants:
        cfg = EngineConfig(
            model=str(ckpt), num_blocks=1024, block_size=16, num_threads=args.torch_threads,
            enable_prefix_caching=False, **VARIANTS[name],
        )
        engines[name] = AsyncLLMEngine(cfg)
    rng = random.Random(0)
    samples: dict[str, list[Sample]] = {name: [] for name in engines}
    try:
        for i in range(args.warmup + args.requests):
            prompt = [rng.randrange(3, 49152) for _ in range(args.prompt_len)]
            order = list(engines) if i % 2 == 0 else list(reversed(engines))
            for name in order:
                s = await one_request(engines[name], f"{name}-{i}", prompt, args.output_len)
                if i >= args.warmup:
                    samples[name].append(s)
                await asyncio.sleep(args.gap_ms / 1e3)
    finally:
        for eng in engines.values():
            await eng.shutdown()
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "summary": {name: summarize(ss) for name, ss in samples.items()},
        "samples": {name: [asdict(s) for s in ss] for name, ss in samples.items()},
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| variant | " + " | ".join(f"{f} p50 / p90 (ms)" for f in FIELDS) + " |",
        "|---|" + "---|" * len(FIELDS),
    ]
    for name, summ in result["summary"].items():
        cells = [f"{summ[f]['p50']:.2f} / {summ[f]['p90']:.2f}" for f in FIELDS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["thread", "process"], choices=list(VARIANTS))
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--gap-ms", type=float, default=20.0,
                   help="pause between requests (the core goes idle, as at c=1 in a client loop)")
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="sys.setswitchinterval for this process (default: Python's 5 ms)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    from benchmarks.tiny_model import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="core-latency-") as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "tiny")
        result = asyncio.run(run(args, ckpt))
    print(json.dumps(result["summary"], indent=1))
    print(table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
