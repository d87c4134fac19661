"""Serve benchmark: our router vs Ray's PrefixCacheAffinityRouter vs Serve's power-of-two.

One local Ray cluster; for each router the app (``cluster.serve.app:build_app``, SmolLM2 on CPU) is
deployed fresh (cold caches), warmed up with two unrelated requests, then driven with the same
shared-prefix chat workload over real HTTP (``openai`` client, streaming, include_usage):

    groups x requests_per_group chats; a chat = a group's long system prompt (the shared
    prefix) + a distinct question; sent interleaved (group i % G) at fixed concurrency.

The KV pool of each replica is sized to hold about half of the groups' prefixes, so where a
group is sent decides whether its prefix is a cache hit or an eviction: the point of
cache-aware routing. Reported per router: prefix-hit token ratio (cached / prompt tokens, from
``usage.prompt_tokens_details.cached_tokens``), TTFT p50/p99 (client side, first content
chunk), output tokens/s and requests/s; ratios against power-of-two measured in the same run.

    python benchmarks/serve_bench.py --json benchmarks/results/serve_bench.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROUTERS = ("tinyserve", "prefix_cache_affinity", "pow2")
MODEL = "smollm2-135m-instruct"
TOPICS = ["astronomy", "baking", "chess", "databases", "ecology", "finance", "geology",
          "history", "immunology", "jazz", "kayaking", "linguistics"]


@dataclass(slots=True)
class Sample:
    ttft_s: float
    latency_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


@dataclass(slots=True)
class RouterResult:
    router: str
    num_requests: int
    num_errors: int
    prefix_hit_ratio: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    output_tokens_per_s: float
    requests_per_s: float
    wall_s: float
    num_selector_decisions: int | None  # tinyserve only: Selects answered in time (of N+2)


def system_prompt(topic: str, num_rules: int) -> str:
    rules = " ".join(f"Rule {i}: when asked about {topic}, be precise and cite step {i}."
                     for i in range(num_rules))
    return f"You are the {topic} expert of a help desk. {rules}"


def workload(args: argparse.Namespace) -> list[list[dict[str, str]]]:
    rng = random.Random(args.seed)
    chats = []
    for r in range(args.requests_per_group):
        for g in range(args.groups):
            topic = TOPICS[g % len(TOPICS)]
            q = f"Question {r}-{rng.randrange(10**6)}: what matters most in {topic}?"
            chats.append([{"role": "system", "content": system_prompt(topic, args.rules)},
                          {"role": "user", "content": q}])
    return chats


def one_chat(client: Any, messages: list[dict[str, str]], max_tokens: int) -> Sample:
    start = time.perf_counter()
    ttft = None
    usage = None
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    assert usage is not None and ttft is not None
    return Sample(ttft, end - start, usage.prompt_tokens,
                  usage.prompt_tokens_details.cached_tokens, usage.completion_tokens)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_router(router: str, args: argparse.Namespace, http_port: int) -> RouterResult:
    import openai
    from ray import serve

    from cluster.serve.app import build_app

    app_args = {
        "engine": {"num_blocks": args.num_blocks, "max_num_seqs": 8, "num_threads": 1},
        "num_replicas": args.replicas,
        "num_cpus_per_replica": 0.5,
        "router": router,
        "router_kwargs": {"select_timeout_s": args.select_timeout_s} if router == "tinyserve"
        else {},
        "selector": {"port": 0},
        "auth": {"enabled": False},  # NOTE: the proxy binds loopback (see main())
    }
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                           max_retries=0, timeout=300)
    for i in range(2):  # warm-up, not counted
        one_chat(client, [{"role": "user", "content": f"Warm up {i}."}], 2)
    chats = workload(args)
    samples: list[Sample] = []
    errors = 0
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(one_chat, client, c, args.max_tokens) for c in chats]
        for f in futures:
            try:
                samples.append(f.result())
            except Exception as exc:
                errors += 1
                print(f"  {router}: request failed: {exc!r}", file=sys.stderr)
    wall = time.perf_counter() - start
    decisions = None
    if router == "tinyserve":
        st = serve.get_deployment_handle("CacheSelector", "bench").stats.remote().result()
        decisions = int(sum(st["decisions"].values()))
    serve.delete("bench")
    prompt = sum(s.prompt_tokens for s in samples)
    return RouterResult(
        router=router, num_requests=len(chats), num_errors=errors,
        prefix_hit_ratio=sum(s.cached_tokens for s in samples) / prompt if prompt else 0.0,
        ttft_p50_s=statistics.median(s.ttft_s for s in samples),
        ttft_p99_s=pct([s.ttft_s for s in samples], 0.99),
        latency_p50_s=statistics.median(s.latency_s for s in samples),
        output_tokens_per_s=sum(s.output_tokens for s in samples) / wall,
        requests_per_s=len(samples) / wall, wall_s=wall, num_selector_decisions=decisions,
    )


def print_table(results: list[RouterResult], base: RouterResult) -> None:
    head = (f"{'router':<22}{'hit ratio':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'tok/s':>8}"
            f"{'req/s':>8}{'errors':>8}  ratios vs pow2 (hit, TTFT p50, TTFT p99, tok/s)")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.router:<22}{r.prefix_hit_ratio:>10.3f}{r.ttft_p50_s:>9.3f}s{r.ttft_p99_s:>9.3f}s"
              f"{r.output_tokens_per_s:>8.2f}{r.requests_per_s:>8.3f}{r.num_errors:>8}  "
              f"{_ratio(r.prefix_hit_ratio, base.prefix_hit_ratio)}, "
              f"{_ratio(r.ttft_p50_s, base.ttft_p50_s)}, {_ratio(r.ttft_p99_s, base.ttft_p99_s)}, "
              f"{_ratio(r.output_tokens_per_s, base.output_tokens_per_s)}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--groups", type=int, default=8, help="distinct shared prefixes")
    p.add_argument("--requests-per-group", type=int, default=5)
    p.add_argument("--rules", type=int, default=14, help="prefix length knob (~17 tokens each)")
    p.add_argument("--num-blocks", type=int, default=96, help="KV blocks per replica")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--select-timeout-s", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write results here")
    args = p.parse_args(argv)

    import socket

    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = int(s.getsockname()[1])
    # NOTE: address="local": always a private cluster, never one that happens to run here.
    ray.init(address="local", num_cpus=max(4, args.replicas + 2), include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    results = []
    try:
        for router in args.routers:
            print(f"== {router}", flush=True)
            results.append(run_router(router, args, http_port))
    finally:
        serve.shutdown()
        ray.shutdown()
    base = next((r for r in results if r.router == "pow2"), results[0])
    print_table(results, base)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "serve_bench", "config": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
            "baseline": base.router, "results": [asdict(r) for r in results],
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(r.num_errors for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
