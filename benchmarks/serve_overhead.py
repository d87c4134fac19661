"""Serving-path overhead: the Serve app against its own engine, same model, same requests.

In one run on one machine:

- engine: ``AsyncLLMEngine`` driven directly in this process (``generate`` per request);
- served: a real local Ray cluster, the app of ``cluster.serve.app:build_app`` (one replica, router
  ``tinyserve`` with its selection service), real HTTP through the ``openai`` client, for
  each endpoint (completions, chat) streaming and not.

Requests: distinct prompts of about ``--prompt-len`` tokens (random words, tokenized exactly
as the ingress does, so the engine gets the very token ids the app computes), ``--output-len``
tokens each (``ignore_eos``, greedy), prefix caching off (every run does the same work).
Closed loop: ``c`` clients, each sending its next request when the last one finished,
``max(--min-requests, --rounds * c)`` requests per run. Per run: output tok/s (output tokens
/ wall), TTFT p50/p99 (send -> first output; streaming only), TPOT p50/p99 ((last - first) /
(n - 1); streaming only), latency p50; and served / engine ratios. Served runs also join the
ingress's and replica's stamps (``cluster.serve.openai_trace``) with the client's into the per-hop
breakdown (medians, ms).

    # CPU, the path's fixed latency at c=1 (a tiny random model: steps of a few ms)
    python benchmarks/serve_overhead.py --model tiny --concurrency 1 --modes stream \\
        --endpoints completions --output-len 16 --min-requests 30 --haproxy --json ...
    # CPU (SmolLM2-135M, small sizes)
    python benchmarks/serve_overhead.py --model smollm2 --concurrency 1 4 16 \\
        --json benchmarks/results/serve_overhead_cpu.json
    # GPU machine (random bf16 Llama shapes), after `. scripts/gpu_site.sh`
    python3 benchmarks/serve_overhead.py --model random-1b --json $OUT/serve_overhead_h100_1b.json
    # re-render the markdown of a results file
    python benchmarks/serve_overhead.py --render benchmarks/results/serve_overhead_cpu.json
    # the replica's engine core as a thread and as its own process, one run
    python benchmarks/serve_overhead.py --engine-process both --json ...
    # Serve's direct ingress: the client talks to the ingress replicas' ports, no proxy hop
    python benchmarks/serve_overhead.py --direct-ingress --json ...
    # Serve's HAProxy mode: HAProxy on the HTTP port in front of the ingress replicas' ports
    python benchmarks/serve_overhead.py --haproxy --app-args '{"ingress_num_replicas": 4}' ...

The engine alone runs in this process, its core on a thread (side ``engine``) and, when the
served replica runs the process core, in a child process too (``engine-proc``); each served
side is compared with the engine on the same core.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

# NOTE: run as a script (python benchmarks/serve_overhead.py) or a module: the repo root on
# sys.path either way.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve_overhead_report import pick_side, render_comparison, render_markdown
from benchmarks.serve_overhead_served import (
    Prompt,
    closed_loop,
    deploy,
    direct_urls,
    measure_served,
    run_served,
    served_traces,
    start_serve,
)
from benchmarks.serve_overhead_stats import RunResult, Sample, print_table, summarize

# NOTE: models that run on CPU (the others are random GPU shapes).
CPU_MODELS = ("smollm2", "tiny")
WORDS = ["time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week", "company", "system", "program", "question", "work", "government", "number", "night", "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city"]


# -- model and requests ------------------------------------------------------------------------
def default_tokenizer_dir() -> Path:
    """The embedded model's tokenizer; on the GPU machine the copy in .whl/tokenizer."""
    try:
        from replicas.model_source import resolve_model_dir

        return resolve_model_dir("default")
    except Exception:
        return Path(__file__).resolve().parent.parent / ".whl" / "tokenizer"


def prepare_model(args: argparse.Namespace) -> tuple[str, Path]:
    """(EngineConfig.model, tokenizer directory) for ``--model``."""
    if args.model == "smollm2":
        from replicas.model_source import resolve_model_dir

        return "default", resolve_model_dir("default")
    if args.model == "tiny":
        from benchmarks.tiny_model import make_tiny_checkpoint

        path = Path(args.checkpoint_dir or tempfile.gettempdir()) / "serve_overhead_tiny"
        return str(make_tiny_checkpoint(path)), path
    from benchmarks.random_llama import LLAMA_1B, LLAMA_8B, make_random_llama

    shape = LLAMA_1B if args.model == "random-1b" else LLAMA_8B
    path = Path(args.checkpoint_dir or tempfile.gettempdir()) / f"serve_overhead_{args.model}"
    t0 = time.perf_counter()
    make_random_llama(path, Path(args.tokenizer or default_tokenizer_dir()), shape)
    print(f"checkpoint {path} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(path), path


def make_prompts(tokenizer: Any, endpoint: str, n: int, prompt_len: int, seed: int) -> list[Prompt]:
    """``n`` distinct prompts of about ``prompt_len`` tokens, with the ingress's token ids."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = [f"Request {seed}-{i}:"] + [rng.choice(WORDS) for _ in range(prompt_len)]
        text = " ".join(words)
        ids = tokenizer.encode(text, add_special_tokens=False)[:prompt_len]
        text = tokenizer.decode(ids)
        if endpoint == "chat":
            templated = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            token_ids = list(tokenizer.encode(templated, add_special_tokens=False))
        else:
            token_ids = list(tokenizer.encode(text))
        prompts.append(Prompt(text, token_ids))
    return prompts


def engine_config(args: argparse.Namespace, model: str) -> dict[str, Any]:
    cuda = args.model not in CPU_MODELS
    max_c = max(args.concurrency)
    max_len = args.prompt_len + args.output_len + 64
    blocks_per_req = -(-max_len // 16)
    return {
        "model": model,
        "device": "cuda" if cuda else "cpu",
        "dtype": "bfloat16" if cuda else "auto",
        "num_blocks": max_c * blocks_per_req + 64,
        "max_num_seqs": min(max_c, 256),
        "max_num_batched_tokens": args.max_num_batched_tokens or (8192 if cuda else 512),
        "enable_prefix_caching": False,
        "stream_interval": args.stream_interval,
        **({} if cuda else {"num_threads": args.threads}),
    }


# -- engine alone --------------------------------------------------------------------------------
def run_engine(engine: Any, prompts: list[Prompt], c: int, endpoint: str,
               args: argparse.Namespace, side: str = "engine") -> RunResult:
    from replicas.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    tag = time.perf_counter_ns()

    core_ttft: dict[float, float] = {}  # send -> the core's own TTFT, ms

    async def one(i: int) -> Sample:
        send = time.perf_counter()
        first = 0.0
        n = 0
        async for out in engine.generate(f"e{tag}-{i}", prompts[i].token_ids, params):
            if out.new_token_ids and not first:
                first = time.perf_counter()
            n = out.num_output_tokens
            if out.trace is not None and out.trace.engine_first_token:
                core_ttft[send] = 1e3 * (out.trace.engine_first_token - out.trace.engine_add)
        return Sample(send, first, time.perf_counter(), n)

    samples, errors = asyncio.run(closed_loop(c, len(prompts), one))
    r = summarize(side, endpoint, True, c, samples, errors)
    # NOTE: the same stamps as the served rows' (inside the engine core): like with like
    r.engine_ttft_ms = [round(v, 3) for _, v in sorted(core_ttft.items())]
    return r


# -- main --------------------------------------------------------------------------------------------
def save_results(args: argparse.Namespace, device: str, results: list[RunResult],
                 total_s: float, partial: bool) -> None:
    """Write ``--json`` (and the markdown beside it) with the runs measured so far.
    NOTE: called after every run with ``partial`` true, so a run killed at a GPU machine's
    command limit keeps what it finished (an 8B grid once lost all of it at 400 s)."""
    if not args.json:
        return
    data = {
        "benchmark": "serve_overhead",
        "device": device,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "label": args.label,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_s": total_s,
        "partial": partial,
        "results": [asdict(r) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(render_markdown(data))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=(*CPU_MODELS, "random-1b", "random-8b"), default="smollm2",
                   help="tiny: 2 random layers of width 64 (CPU), so the path, not the model, "
                   "dominates the latencies")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="default: 1 16 64 256 (GPU), 1 4 16 (CPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 1024 GPU, 64 CPU")
    p.add_argument("--output-len", type=int, default=None, help="default 128 GPU, 32 CPU")
    p.add_argument("--rounds", type=int, default=2, help="requests per client per run")
    p.add_argument("--client-procs", type=int, default=0,
                   help="client processes sharing the concurrency (default: on a GPU c/4 "
                   "between 4 and 16, so that no process sends more than a few requests of a "
                   "wave (benchmarks/client_send_lag.py); 1 on CPU, where the box's 2 cores "
                   "are the app's)")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--endpoints", nargs="+", default=["completions", "chat"],
                   choices=("completions", "chat"))
    p.add_argument("--modes", nargs="+", default=["stream", "nostream"],
                   choices=("stream", "nostream"))
    p.add_argument("--stream-interval", type=int, default=None, help="default 8 GPU, 1 CPU")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads of the engine")
    p.add_argument("--max-num-batched-tokens", type=int, default=0)
    p.add_argument("--app-args", default="{}", help="JSON merged into the app's args")
    p.add_argument("--engine-process", choices=("default", "off", "on", "both"),
                   default="default",
                   help="the replica's engine core: the device's default (EngineConfig: a "
                   "process on CUDA, a thread on CPU), a thread (off), its own process (on), "
                   "or both one after the other against the same engine-alone baseline "
                   "(sides served and served-proc)")
    p.add_argument("--variant", nargs="+", default=[], metavar="NAME=JSON",
                   help="more served passes, each with JSON merged over --app-args, e.g. "
                   "'no-early={\"early_start\": false}' (side served-proc:no-early); the "
                   "default pass and these alternate --variant-rounds times (sides ...@k)")
    p.add_argument("--variant-rounds", type=int, default=1,
                   help="rounds of the served passes, alternated (with --variant)")
    p.add_argument("--warm-pass", choices=("auto", "on", "off"), default="auto",
                   help="an unmeasured run per endpoint and concurrency before the measured "
                   "one(s), on both sides alike (auto: on a GPU, where a fresh engine's first "
                   "run of a shape reads slow)")
    p.add_argument("--cpu-roles", choices=("on", "off"), default="on",
                   help="each served run's CPU by role (ingress, replica, engine, haproxy, "
                   "client ...: ms per request, the busiest process in cores) and the host's "
                   "busy fraction (benchmarks/path_capacity_procs.py)")
    p.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="environment of the Ray cluster (Serve flags), e.g. "
                   "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0")
    p.add_argument("--loop-lag", type=float, default=0.0, metavar="MS",
                   help="sample the ingress's and the replica's event-loop lag every MS ms "
                   "(replicas/loop_lag.py) and add it to the hop table")
    p.add_argument("--direct-ingress", action="store_true",
                   help="Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): the client "
                   "talks to the ingress replica's own HTTP port, not the proxy "
                   "(cluster/serve/direct_ingress.py)")
    p.add_argument("--haproxy", action="store_true",
                   help="Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1, with direct "
                   "ingress): the client talks to HAProxy on the HTTP port, which spreads "
                   "requests over the ingress replicas' own ports")
    p.add_argument("--checkpoint-dir", default="", help="where random checkpoints are written")
    p.add_argument("--tokenizer", default="", help="tokenizer dir of random checkpoints")
    p.add_argument("--label", default="", help="a note stored with the results")
    p.add_argument("--json", type=Path, default=None, help="results JSON (+ .md beside it)")
    p.add_argument("--render", type=Path, default=None, help="only re-render this JSON's .md")
    p.add_argument("--compare", nargs="+", default=None, metavar="NAME=JSON",
                   help="only print a side-by-side markdown of several results files; "
                   "JSON#served-proc picks a file's process-core rows")
    args = p.parse_args(argv)
    if args.compare:
        runs = []
        for name, _, spec in (c.partition("=") for c in args.compare):
            path, _, side = spec.partition("#")
            runs.append((name, pick_side(json.loads(Path(path).read_text()), side or "served")))
        print(render_comparison(runs), end="")
        return 0
    if args.render is not None:
        data = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render_markdown(data))
        print(f"wrote {args.render.with_suffix('.md')}")
        return 0
    gpu = args.model not in CPU_MODELS
    if args.direct_ingress and args.haproxy:
        p.error("--haproxy already routes through the ingress replicas' own ports: pick one")
    if args.direct_ingress or args.haproxy:
        args.serve_env = [*args.serve_env, "RAY_SERVE_ENABLE_DIRECT_INGRESS=1"]
    if args.haproxy:
        args.serve_env = [*args.serve_env, "RAY_SERVE_ENABLE_HA_PROXY=1"]
    args.concurrency = args.concurrency or ([1, 16, 64, 256] if gpu else [1, 4, 16])
    args.prompt_len = args.prompt_len or (1024 if gpu else 64)
    args.output_len = args.output_len or (128 if gpu else 32)
    args.stream_interval = args.stream_interval or (8 if gpu else 1)
    args.gpu = gpu
    args.warm_pass = {"auto": gpu, "on": True, "off": False}[args.warm_pass]
    args.cpu_roles = args.cpu_roles == "on"
    if args.loop_lag:
        args.serve_env = [*args.serve_env, f"TINYSERVE_LOOP_LAG={args.loop_lag:g}"]

    t_start = time.perf_counter()
    model, tok_dir = prepare_model(args)
    from replicas.model_loader import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    workload: dict[tuple[str, int], list[Prompt]] = {}
    for endpoint in args.endpoints:
        for c in args.concurrency:
            n = max(args.min_requests, args.rounds * c)
            workload[endpoint, c] = make_prompts(tokenizer, endpoint, n, args.prompt_len, c)

    results: list[RunResult] = []
    # Phase 1: the engine alone, in this process.
    import torch

    device_name = torch.cuda.get_device_name() if gpu else platform.processor() or "cpu"
    # NOTE: a SIGTERM (a command's timeout) ends the run through the finally blocks below
    # (Serve and Ray shut down), with the runs measured so far already written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from replicas.config import EngineConfig
    from replicas.engine import AsyncLLMEngine

    default = bool(EngineConfig(**engine_config(args, model)).engine_process)
    cores = {"default": [default], "off": [False], "on": [True], "both": [False, True]}[
        args.engine_process
    ]
    # NOTE: two warm-up requests per ingress replica, all of them at once: a replica's first
    # request pays one-time costs (its handle, its selector connection) that would otherwise
    # land in the first measured run (H100 run7, 4 ingress replicas, 2 warm-ups: c=1 TTFT p99
    # 90-255 ms against p50 39).
    ingresses = int(json.loads(args.app_args).get("ingress_num_replicas", 1))
    warm = make_prompts(tokenizer, "completions", 2 * ingresses, args.prompt_len, 99_999)
    # NOTE: the thread core is the reference (side "engine"); with --engine-process on/both
    # the engine alone also runs with its core in a child process ("engine-proc"): the cost
    # of the process hop itself, without Serve around it.
    for in_process in sorted({False, *cores}):
        side = "engine-proc" if in_process else "engine"
        engine = AsyncLLMEngine(
            EngineConfig(**engine_config(args, model), engine_process=in_process))
        run_engine(engine, warm, 2, "completions", args, side)
        for (endpoint, c), prompts in workload.items():
            if args.warm_pass:
                # NOTE: one unmeasured pass per concurrency first: in the first run of a GPU
                # machine start the first pass at c=16 read half the tok/s of a warm one (3,750
                # and ~3,100 vs 7,150, 1B, run6; not yet explained: kernel variants built on
                # first use and kept in an on-disk cache would fit). measure_served does the same.
                run_engine(engine, prompts, c, endpoint, args, side)
            r = run_engine(engine, prompts, c, endpoint, args, side)
            results.append(r)
            print(f"{side} {endpoint} c={c}: {r.output_tok_s:.1f} tok/s", flush=True)
            save_results(args, device_name, results, time.perf_counter() - t_start, True)
        asyncio.run(engine.shutdown())
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Phase 2: the served app, the same requests; once per engine core (thread, process).
    import ray
    from ray import serve

    variants: list[tuple[str, dict[str, Any]]] = [("", {})]
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        variants.append((name, json.loads(extra)))
    passes = [(in_process, name, extra, k) for k in range(args.variant_rounds)
              for in_process in cores for name, extra in variants]
    http = start_serve(args)
    try:
        for in_process, name, extra, k in passes:
            side = ("served-proc" if in_process else "served") + (f":{name}" if name else "")
            side += f"@{k + 1}" if args.variant_rounds > 1 else ""
            model_name = deploy(args, {**engine_config(args, model), "engine_process": in_process},
                                extra)
            url = direct_urls(http, ingresses) if args.direct_ingress else http
            run_served(url, model_name, warm, len(warm), "completions", True, args)
            served_traces(ingresses)
            for r in measure_served(url, model_name, workload, args, side, ingresses):
                results.append(r)
                print(f"{side} {r.endpoint} {'stream' if r.stream else 'nostream'} "
                      f"c={r.concurrency}: {r.output_tok_s:.1f} tok/s", flush=True)
                save_results(args, device_name, results, time.perf_counter() - t_start, True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print_table(results)
    total_s = time.perf_counter() - t_start
    print(f"total {total_s:.0f} s")
    save_results(args, device_name, results, total_s, False)
    if args.json:
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 1 if any(r.num_errors for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
