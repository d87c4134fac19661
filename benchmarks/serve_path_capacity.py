"""The serving path's capacity on this CPU box: the app with a near-free engine, driven hard.

What it isolates: the CPU the serving path (Serve's proxy, the ingress replicas, the router
and Select, the replica's output side) spends per request and per streamed chunk, which on a
fast GPU engine becomes the bound (benchmarks/results/serve_overhead_notes.md, issue 16). The
engine is ``benchmarks.tiny_model``'s random checkpoint (two layers of width 64, the default
model's real tokenizer and template): a step costs a few milliseconds, so requests/s is the
path's, not the model's.

One local Ray cluster, the app of ``cluster.serve.app:build_app`` (one LLM replica, router
``tinyserve`` with its selection service), driven over real HTTP by a lean aiohttp client in
its own process (closed loop, ``--concurrency`` clients, distinct ``--prompt-len``-token
prompts, ``--output-len`` tokens each with ``ignore_eos``). Per (endpoint, mode): requests/s,
output tok/s, streamed chunks, and the CPU seconds of every role
(``benchmarks.path_capacity_procs``: proxy, ingress, replica, selector, controller, ray,
client, driver) per request and per streamed chunk, from psutil over the Ray worker pids.

    flock /tmp/tinyserve-heavy.lock .venv/bin/python benchmarks/serve_path_capacity.py \\
        --json benchmarks/results/serve_path_capacity_cpu.json
    # py-spy profiles (collapsed stacks per role) of the first measured run
    ... --profile /tmp/pathprof
    # re-print a results file's table
    python benchmarks/serve_path_capacity.py --render benchmarks/results/serve_path_capacity_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import path_capacity_procs as procs

APP = "overhead"  # NOTE: serve_overhead_served's app name (its deploy() is reused)


# -- the client (its own process) ------------------------------------------------------------------
async def _drive(url: str, prompts: list[str], endpoint: str, stream: bool, c: int,
                 output_len: int) -> dict[str, Any]:
    """Closed loop over ``prompts``; counts requests, output tokens (the usage) and SSE chunks.

    NOTE: deliberately lean (no ``openai`` client, one json.loads per response or per usage
    chunk only), so the client's own CPU stays small next to the path it measures."""
    import aiohttp

    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    errors: list[str] = []
    tokens = chunks = done = 0
    latencies: list[float] = []
    next_i = iter(range(len(prompts)))

    def body(text: str) -> bytes:
        b: dict[str, Any] = {"model": APP, "max_tokens": output_len, "temperature": 0,
                             "ignore_eos": True, "stream": stream}
        if endpoint == "chat":
            b["messages"] = [{"role": "user", "content": text}]
        else:
            b["prompt"] = text
        if stream:
            b["stream_options"] = {"include_usage": True}
        return json.dumps(b).encode()

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
            url, connector=conn, timeout=aiohttp.ClientTimeout(total=600),
            headers={"Content-Type": "application/json"}) as session:

        async def worker() -> None:
            nonlocal tokens, chunks, done
            for i in next_i:
                t0 = time.perf_counter()
                try:
                    async with session.post(path, data=body(prompts[i])) as r:
                        if r.status != 200:
                            errors.append(f"{r.status}: {(await r.text())[:200]}")
                            continue
                        if not stream:
                            tokens += json.loads(await r.read())["usage"]["completion_tokens"]
                        else:
                            last = b""
                            async for line in r.content:
                                if line.startswith(b"data: "):
                                    chunks += 1
                                    if b'"usage":{' in line:
                                        last = line
                            tokens += json.loads(last[6:])["usage"]["completion_tokens"]
                except Exception as exc:  # NOTE: counted and shown; the run goes on
                    errors.append(repr(exc))
                    continue
                done += 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"wall_s": wall, "num_requests": done, "output_tokens": tokens, "chunks": chunks,
            "errors": errors[:5], "num_errors": len(errors),
            "latency_p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None}


def client_main(spec_path: str) -> int:
    """``--client SPEC``: read the spec, say "ready", wait for "go" on stdin, drive, print the
    result as one JSON line, then wait for stdin to close (so the driver reads our CPU)."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print("ready", flush=True)
    sys.stdin.readline()
    out = asyncio.run(_drive(spec["url"], spec["prompts"], spec["endpoint"], spec["stream"],
                             spec["concurrency"], spec["output_len"]))
    print(json.dumps(out), flush=True)
    sys.stdin.read()
    return 0


# -- the driver ------------------------------------------------------------------------------------
def _profile(pids: dict[str, list[int]], seconds: float, out_dir: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy record (raw collapsed stacks, native threads off) of each role's first pid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    running = []
    for role, role_pids in pids.items():
        for k, pid in enumerate(role_pids):
            dest = out_dir / f"{role}{k}.txt"
            running.append(subprocess.Popen(
                [str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                 "--rate", "50", "--format", "raw", "--nonblocking",
                 "--output", str(dest)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return running


def measure(url: str, prompts: list[str], endpoint: str, stream: bool, args: argparse.Namespace,
            profile_dir: Path | None = None) -> dict[str, Any]:
    """One closed-loop run from a fresh client process; the run's figures and CPU by role."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"url": url, "prompts": prompts, "endpoint": endpoint, "stream": stream,
                   "concurrency": args.concurrency, "output_len": args.output_len}, f)
    client = subprocess.Popen(
        [sys.executable, __file__, "--client", f.name], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError("the client did not start")
        before = procs.snapshot(os.getpid(), client.pid, APP)
        spies = []
        if profile_dir is not None:
            roles = ("proxy", "ingress", "replica", "engine", "selector", "client")
            spies = _profile({r: procs.pids_of(before, r)[:2] for r in roles},
                             args.profile_seconds, profile_dir)
        client.stdin.write("go\n")
        client.stdin.flush()
        result = json.loads(client.stdout.readline())
        after = procs.snapshot(os.getpid(), client.pid, APP)
        for spy in spies:
            spy.wait()
    finally:
        client.stdin.close()
        client.wait(timeout=60)
        os.unlink(f.name)
    cpu = procs.cpu_by_role(before, after)
    n, chunks = max(result["num_requests"], 1), result["chunks"]
    wall = result["wall_s"]
    return {
        "endpoint": endpoint, "stream": stream, "concurrency": args.concurrency,
        **result,
        "requests_per_s": result["num_requests"] / wall,
        "output_tok_s": result["output_tokens"] / wall,
        "chunks_per_request": chunks / n,
        "cpu_s": cpu,
        "cpu_ms_per_request": {r: 1e3 * s / n for r, s in cpu.items()},
        "cpu_us_per_chunk": {r: 1e6 * s / chunks for r, s in cpu.items()} if chunks else {},
        "cpu_total_s": sum(cpu.values()),
        "cpu_busy_frac": sum(cpu.values()) / wall / (os.cpu_count() or 1),
        "num_procs": {r: len(procs.pids_of(after, r)) for r in procs.ROLES},
    }


def render(data: dict[str, Any]) -> str:
    roles = [r for r in procs.ROLES if r != "driver"]
    head = ("| endpoint | mode | req/s | out tok/s | chunks/req | "
            + " | ".join(f"{r} ms/req" for r in roles) + " | total ms/req | busy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in data["results"]:
        per = r["cpu_ms_per_request"]
        total = sum(per.values())
        lines.append(
            f"| {r['endpoint']} | {'stream' if r['stream'] else 'no stream'} "
            f"| {r['requests_per_s']:.1f} | {r['output_tok_s']:.0f} | {r['chunks_per_request']:.1f} | "
            + " | ".join(f"{per.get(x, 0.0):.1f}" for x in roles)
            + f" | {total:.1f} | {r['cpu_busy_frac']:.2f} |")
    stream_rows = [r for r in data["results"] if r["stream"] and r["cpu_us_per_chunk"]]
    if stream_rows:
        lines += ["", "| endpoint (stream) | " + " | ".join(f"{r} us/chunk" for r in roles) + " |",
                  "|---|" + "---|" * len(roles)]
        for r in stream_rows:
            lines.append(f"| {r['endpoint']} | "
                         + " | ".join(f"{r['cpu_us_per_chunk'].get(x, 0.0):.0f}" for x in roles) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=128, help="requests per run")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--endpoints", nargs="+", default=["completions", "chat"],
                   choices=("completions", "chat"))
    p.add_argument("--modes", nargs="+", default=["stream", "nostream"],
                   choices=("stream", "nostream"))
    p.add_argument("--stream-interval", type=int, default=8, help="the GPU default")
    p.add_argument("--app-args", default="{}", help="JSON merged into the app's args")
    p.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--direct-ingress", action="store_true",
                   help="Serve's direct ingress: the client talks to the ingress replica's port")
    p.add_argument("--engine-process", choices=("on", "off"), default="on",
                   help="the replica's engine core in its own process (on: its CPU is the "
                   "'engine' role, apart from the replica's serving side)")
    p.add_argument("--profile", type=Path, default=None,
                   help="py-spy collapsed stacks of the first measured run into this folder")
    p.add_argument("--profile-seconds", type=float, default=15.0)
    p.add_argument("--label", default="")
    p.add_argument("--json", type=Path, default=None, help="results JSON (+ .md beside it)")
    p.add_argument("--render", type=Path, default=None, help="only print this JSON's table")
    args = p.parse_args(argv)
    if args.direct_ingress:
        args.serve_env = [*args.serve_env, "RAY_SERVE_ENABLE_DIRECT_INGRESS=1"]
    if args.client:
        return client_main(args.client)
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    t_start = time.perf_counter()
    from benchmarks.serve_overhead import make_prompts
    from benchmarks.serve_overhead_served import deploy, direct_urls, start_serve
    from benchmarks.tiny_model import make_tiny_checkpoint
    from replicas.model_loader import load_tokenizer

    ckpt = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="path_capacity_")))
    tokenizer = load_tokenizer(ckpt)
    max_len = args.prompt_len + args.output_len + 64
    engine = {
        "model": str(ckpt), "device": "cpu", "dtype": "float32",
        "num_blocks": args.concurrency * -(-max_len // 16) + 64,
        "max_num_seqs": args.concurrency, "max_num_batched_tokens": 8192,
        "enable_prefix_caching": False, "stream_interval": args.stream_interval,
        "num_threads": 1, "engine_process": args.engine_process == "on",
    }
    # NOTE: serve_overhead_served.deploy reads these two fields of its own namespace.
    dargs = argparse.Namespace(concurrency=[args.concurrency], output_len=args.output_len,
                               app_args=args.app_args, serve_env=args.serve_env)
    import ray
    from ray import serve

    results = []
    http = start_serve(dargs)
    try:
        deploy(dargs, engine)
        # NOTE: one client url: the first ingress replica's own port under direct ingress.
        url = direct_urls(http)[0] if args.direct_ingress else http
        warm = [p.text for p in make_prompts(tokenizer, "completions", args.concurrency,
                                             args.prompt_len, 99_999)]
        measure(url, warm, "completions", True, args)
        profile_dir = args.profile
        for endpoint in args.endpoints:
            prompts = [p.text for p in make_prompts(
                tokenizer, endpoint, args.requests, args.prompt_len, len(results) + 1)]
            for mode in args.modes:
                r = measure(url, prompts, endpoint, mode == "stream", args, profile_dir)
                profile_dir = None
                results.append(r)
                per = r["cpu_ms_per_request"]
                print(f"{endpoint} {mode}: {r['requests_per_s']:.1f} req/s, "
                      f"{r['output_tok_s']:.0f} tok/s, errors {r['num_errors']}; CPU ms/req "
                      + ", ".join(f"{k} {v:.1f}" for k, v in per.items()), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    data = {
        "benchmark": "serve_path_capacity",
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "label": args.label,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engine": engine | {"model": "tiny random llama (benchmarks.tiny_model)"},
        "total_s": time.perf_counter() - t_start,
        "results": results,
    }
    table = render(data)
    print(table, end="")
    print(f"total {data['total_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(table)
        print(f"wrote {args.json}")
    return 1 if any(r["num_errors"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
