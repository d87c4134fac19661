"""serve_overhead's served side: the app on a private local Ray cluster, driven over real HTTP
by the ``openai`` client, closed loop (``closed_loop``, shared with the engine side)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from benchmarks import path_capacity_procs
from benchmarks.serve_overhead_stats import RunResult, Sample, hop_rows, medians, summarize

APP = "overhead"


@dataclass(slots=True)
class Prompt:
    """One request as the client sends it and as the engine receives it."""

    text: str  # completions: the prompt; chat: the user message
    token_ids: list[int]  # what the ingress computes from it (template included for chat)


async def closed_loop(concurrency: int, n: int, one: Callable[[int], Any]) -> tuple[
        list[Sample], int]:
    """``concurrency`` workers draining request indices 0..n-1; (samples, errors)."""
    samples: list[Sample] = []
    errors = 0
    next_index = iter(range(n))

    async def worker() -> None:
        nonlocal errors
        for i in next_index:
            try:
                samples.append(await one(i))
            except Exception as exc:  # NOTE: counted and shown; the run goes on.
                errors += 1
                print(f"  request {i} failed: {exc!r}", file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, errors



def client_procs_for(requested: int, c: int, gpu: bool) -> int:
    """Client processes for concurrency ``c``: ``requested`` when given (> 0), else on a GPU
    c/4 within [4, 16] (one ``openai`` process needs ~0.5 ms to send each request of a wave:
    ``benchmarks/client_send_lag.py``), on CPU 1; never more than ``c``."""
    n = requested if requested > 0 else (min(16, max(4, c // 4)) if gpu else 1)
    return max(1, min(n, c))


def run_served(http: str | list[str], model_name: str, prompts: list[Prompt], c: int, endpoint: str,
               stream: bool, args: argparse.Namespace, side: str = "served",
               ) -> tuple[RunResult, list[Sample]]:
    """One closed-loop run of ``c`` clients over ``prompts``; with ``args.client_procs`` > 1
    the clients are split over that many processes (at most ``c``), each its own event loop.

    NOTE: one Python process with the ``openai`` client tops out well below what the app
    serves at c >= 64 (its loop parses every SSE chunk), and its own lag reads as the app's
    latency; several processes are what many real clients are. ``perf_counter`` is the
    system-wide monotonic clock on Linux, so the processes' stamps are comparable."""
    urls = [http] if isinstance(http, str) else list(http)
    procs = client_procs_for(args.client_procs, c, getattr(args, "gpu", False))
    cpu = getattr(args, "cpu_roles", False)
    if procs == 1:
        window = CpuWindow(time.time()) if cpu else None
        samples, errors = client_run(urls, model_name, prompts, c, endpoint, stream,
                                     args.output_len)
        usage = window.stop(len(samples)) if window else {}
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        start_at = time.time() + 5.0  # NOTE: the processes start their loops together
        window = CpuWindow(start_at) if cpu else None
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = [
                ex.submit(client_run, urls, model_name, prompts[k::procs],
                          c // procs + (k < c % procs), endpoint, stream, args.output_len,
                          start_at)
                for k in range(procs)]
            parts = [f.result() for f in futures]
            usage = window.stop(sum(len(p) for p, _ in parts)) if window else {}
        samples = [s for part, _ in parts for s in part]
        errors = sum(e for _, e in parts)
    r = summarize(side, endpoint, stream, c, samples, errors)
    r.cpu = usage
    return r, samples


class CpuWindow:
    """The CPU every process of this run's tree (Ray's, the app's, the clients') and the host
    spend from wall time ``start_at`` (a timer thread takes the first snapshot then: the client
    processes' start-up stays out) to ``stop`` (before the clients exit); see
    ``benchmarks.path_capacity_procs.cpu_report``."""

    def __init__(self, start_at: float) -> None:
        self._begun = threading.Event()
        timer = threading.Timer(max(start_at - time.time(), 0.0), self._begin)
        timer.daemon = True
        timer.start()

    def _begin(self) -> None:
        self._t0 = time.perf_counter()
        self._host0 = path_capacity_procs.host_busy_seconds()
        self._before = path_capacity_procs.snapshot(os.getpid(), None, APP)
        self._begun.set()

    def stop(self, num_requests: int) -> dict[str, Any]:
        self._begun.wait()
        after = path_capacity_procs.snapshot(os.getpid(), None, APP)
        host = path_capacity_procs.host_busy_seconds()
        return path_capacity_procs.cpu_report(self._before, after, self._host0, host,
                                              time.perf_counter() - self._t0, num_requests)


def client_run(urls: list[str], model_name: str, prompts: list[Prompt], c: int, endpoint: str,
               stream: bool, output_len: int, start_at: float = 0.0,
               ) -> tuple[list[Sample], int]:
    """The closed loop of one client process: ``c`` workers, requests round robin over
    ``urls`` (direct ingress replicas), from wall time ``start_at`` on."""
    import openai

    async def main() -> tuple[list[Sample], int]:
        # NOTE: the client's default pool (1,000 connections) covers every concurrency here.
        clients = [openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0,
                                      timeout=600) for u in urls]
        try:
            async def call(client: Any, text: str, max_tokens: int) -> Sample:
                common = dict(model=model_name, max_tokens=max_tokens, temperature=0,
                              extra_body={"ignore_eos": True})
                send = time.perf_counter()
                if endpoint == "chat":
                    msgs = [{"role": "user", "content": text}]
                    if not stream:
                        r = await client.chat.completions.create(messages=msgs, **common)
                        end = time.perf_counter()
                        return Sample(send, end, end, r.usage.completion_tokens, r.id)
                    s = await client.chat.completions.create(
                        messages=msgs, stream=True, stream_options={"include_usage": True},
                        **common)
                else:
                    if not stream:
                        r = await client.completions.create(prompt=text, **common)
                        end = time.perf_counter()
                        return Sample(send, end, end, r.usage.completion_tokens, r.id)
                    s = await client.completions.create(
                        prompt=text, stream=True, stream_options={"include_usage": True},
                        **common)
                first = last = 0.0
                n = 0
                rid = ""
                async for chunk in s:
                    now = time.perf_counter()
                    rid = chunk.id
                    if chunk.choices:
                        first = first or now
                        if chunk.choices[0].finish_reason is not None:
                            last = now
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
                return Sample(send, first, last or time.perf_counter(), n, rid)

            async def one(i: int) -> Sample:
                return await call(clients[i % len(clients)], prompts[i].text, output_len)

            # NOTE: a fresh client process's first wave reaches the server ~25 ms later than
            # its next ones (lazy set-up inside openai/httpx, then one new connection per
            # concurrent request; CPU box, a wave of 4: 25 vs 3 ms, `client_send_lag.py
            # --first-wave`). With two waves per run that was half the measured requests'
            # client -> ingress hop, so each process first sends ``c`` short requests of the
            # same kind at once; they are not measured (their ids join no sample).
            await asyncio.gather(*(call(clients[i % len(clients)], "warm up", 1)
                                   for i in range(c)))
            await asyncio.sleep(max(0.0, start_at - time.time()))
            return await closed_loop(c, len(prompts), one)
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(main())


def start_serve(args: argparse.Namespace) -> str:
    """A private local Ray cluster and Serve's proxy; returns the base http url."""
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    for kv in args.serve_env:
        key, _, value = kv.partition("=")
        os.environ[key] = value
    # NOTE: address="local": always a private cluster; workers inherit this environment.
    ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def app_args_for(args: argparse.Namespace, engine: dict[str, Any],
                 variant: dict[str, Any] | None = None) -> dict[str, Any]:
    """The app's args: the benchmark's, ``--app-args`` over them, then ``variant``'s; an
    ``engine`` key in either merges into ``engine`` (an EngineConfig dict) key by key."""
    overrides = [json.loads(args.app_args), variant or {}]
    for extra in overrides:
        engine = {**engine, **extra.get("engine", {})}
    return {
        "engine": engine,
        "num_replicas": 1,
        "num_cpus_per_replica": 1.0,
        "num_gpus_per_replica": 1.0 if engine["device"] == "cuda" else 0.0,
        "max_ongoing_requests": max(max(args.concurrency), 1),
        "router": "tinyserve",
        "selector": {"port": 0},
        "served_model_name": "overhead",
        "default_max_tokens": args.output_len,
        "auth": {"enabled": False},  # NOTE: the proxy binds loopback (start_serve)
        **{k: v for extra in overrides for k, v in extra.items() if k != "engine"},
    }


def deploy(args: argparse.Namespace, engine: dict[str, Any],
           variant: dict[str, Any] | None = None) -> str:
    """(Re)deploy the app with ``app_args_for(args, engine, variant)``; returns the served
    model name. A previous deployment of the app is deleted first."""
    from ray import serve

    from cluster.serve.app import build_app

    if APP in serve.status().applications:
        serve.delete(APP)
    app_args = app_args_for(args, engine, variant)
    t0 = time.perf_counter()
    serve.run(build_app(app_args), name=APP, route_prefix="/")
    print(f"app up in {time.perf_counter() - t0:.0f} s "
          f"(engine_process={app_args['engine'].get('engine_process', False)})", flush=True)
    return "overhead"


def direct_urls(proxy: str, count: int = 1, timeout_s: float = 60.0) -> list[str]:
    """The ingress replicas' own base urls under direct ingress (not ``proxy``'s), once
    ``count`` of them are up. NOTE: the client spreads requests over them round robin, as the
    load balancer in front of them (Serve's HAProxy mode, a cloud LB) would."""
    from cluster.serve import direct_ingress

    urls = direct_ingress.direct_urls(APP, proxy, count, timeout_s)
    print(f"direct ingress at {' '.join(urls)} (proxy {proxy})", flush=True)
    return urls


def served_traces(num_ingress: int = 1) -> list[dict[str, Any]]:
    """The finished requests' traces of every ingress replica (each call of ``traces`` empties
    the log of the replica the handle picks: ``8 x num_ingress`` calls reach them all with
    near certainty when the handle spreads calls)."""
    from ray import serve

    handle = serve.get_deployment_handle("OpenAIIngress", APP)
    out: list[dict[str, Any]] = []
    for _ in range(8 * num_ingress if num_ingress > 1 else 1):
        out += handle.traces.remote().result(timeout_s=60)
    return out


def measure_served(url: str | list[str], model_name: str,
                   workload: dict[tuple[str, int], list[Prompt]], args: argparse.Namespace,
                   side: str, ingresses: int) -> Iterator[RunResult]:
    """The served app's measured runs, one per endpoint, concurrency and mode, each with its
    per-hop breakdown, yielded as they finish. With ``args.warm_pass`` an unmeasured run of the
    first mode precedes each (endpoint, concurrency), as on the engine's side, and its traces
    are dropped.
    NOTE: without it the served side's first cell (c=1) read the replica's engine TTFT 2.2-4.8
    ms above the next cell's in four of eight passes (H100, sessions 17-18:
    serve_overhead_notes.md)."""
    for (endpoint, c), prompts in workload.items():
        if args.warm_pass:
            run_served(url, model_name, prompts, c, endpoint, args.modes[0] == "stream", args)
            served_traces(ingresses)
        for mode in args.modes:
            stream = mode == "stream"
            r, samples = run_served(url, model_name, prompts, c, endpoint, stream, args, side)
            traces = served_traces(ingresses)
            rows = hop_rows(samples, traces, stream)
            r.hops_ms = medians(rows)
            r.engine_ttft_ms = [round(v, 3) for v in rows["engine_ttft"]]
            ids = {x.response_id for x in samples}  # NOTE: not the clients' warm-ups
            r.num_early = sum(1 for t in traces
                              if t["response_id"] in ids and t.get("replica_claim"))
            yield r
