"""One deployment and one replay of the routing A/B (``benchmarks.gpu_ab``): ``deploy`` runs
the Serve app with one router and waits until it answers; ``replay`` sends one workload under
one policy through the ``openai`` streaming client and measures it: client-side TTFT and TPOT
(``tpot``), and the replicas' pools sampled while it runs (``PoolSampler``: KV usage, prompt
tokens per replica, hence the load imbalance, and each replica's requests in flight over
time, the replay's ``timeline``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from benchmarks.gpu_ab_plan import PLAN, POLICIES
from benchmarks.loadgen import LoadRecord, Replayer, summarize
from benchmarks.workloads import build_workload

APP = "tinyserve"


class PoolSampler:
    """Samples every LLM replica's pool (usage, counters) and its requests in flight, in a
    thread while a replay runs.

    NOTE: a handle call reaches ONE replica (whichever the router picks), so the replicas are
    asked directly, through their Serve actors' ``record_routing_stats`` (the deployment's
    routing-stats hook, which reports the pool's counters). ``actors`` / ``get``: given, they
    stand in for the Serve actors and ``ray.get`` (tests).

    ``timeline``: per replica, [seconds since the sampler started (just before the replay),
    requests in flight, their prompt + output tokens] every ``period_s``: where a burst
    queued (session 13: b2b_saas's tail was returning tenants piled on one replica)."""

    def __init__(self, num_replicas: int, period_s: float = 0.1,
                 actors: dict[str, Any] | None = None,
                 get: Callable[[Any], dict[str, Any]] | None = None) -> None:  # fmt: skip
        if actors is None:
            import ray

            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if f"{APP}#LLMReplica#" in a["name"]]
            if len(names) != num_replicas:
                raise RuntimeError(
                    f"found {len(names)} LLMReplica actors, expected {num_replicas}")
            actors = {n.rsplit("#", 1)[-1]: ray.get_actor(n, namespace="serve") for n in names}
        self.actors = actors
        self._get = get or _ray_get
        self.period_s = period_s
        self.usage: dict[str, list[float]] = {r: [] for r in self.actors}
        self.timeline: dict[str, list[list[float]]] = {r: [] for r in self.actors}
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        refs = {r: a.record_routing_stats.remote() for r, a in self.actors.items()}
        return {r: self._get(ref) for r, ref in refs.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            t = round(time.perf_counter() - self._t0, 3)
            for rid, st in self.snapshot().items():
                self.usage[rid].append(float(st["kv_usage"]))
                self.timeline[rid].append([t, st["num_inflight"], st["num_inflight_tokens"]])

    def __enter__(self) -> PoolSampler:
        self.before = self.snapshot()
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self.snapshot()

    def figures(self) -> dict[str, Any]:
        prompt = {r: self.after[r]["prefix_query_tokens"] - self.before.get(r, {}).get(
            "prefix_query_tokens", 0) for r in self.after}
        vals = list(prompt.values())
        mean = float(np.mean(vals)) if vals else 0.0
        usage = [float(np.mean(u)) for u in self.usage.values() if u]
        return {"prompt_tokens_per_replica": prompt,
                "imbalance": max(vals) / mean if mean > 0 else 0.0,
                "kv_usage_mean": float(np.mean(usage)) if usage else 0.0,
                "kv_usage_max": max((max(u) for u in self.usage.values() if u), default=0.0),
                "inflight_max": {r: max((x[1] for x in tl), default=0)
                                 for r, tl in self.timeline.items()},
                "timeline": self.timeline}


def _ray_get(ref: Any) -> dict[str, Any]:
    import ray

    return dict(ray.get(ref, timeout=60))


def tpot(records: list[LoadRecord]) -> dict[str, float]:
    """Client-side time per output token after the first (finished, error-free requests)."""
    t = np.asarray([(r.finish_s - r.first_token_s) / (r.num_output_tokens - 1)
                    for r in records if not r.error and r.num_output_tokens > 1])
    if not len(t):
        return {}
    return {"tpot_p50_s": float(np.percentile(t, 50)), "tpot_p90_s": float(np.percentile(t, 90))}


def deploy(router: str, engine: dict[str, Any], replicas: int, device: str, http: str,
           num_gpus_per_replica: float = 1.0, objective: dict[str, Any] | None = None) -> float:
    from ray import serve

    from cluster.serve.app import build_app

    args = {"engine": engine, "num_replicas": replicas, "router": router,
            "num_cpus_per_replica": 2 if device == "cuda" else 1,
            "num_gpus_per_replica": num_gpus_per_replica if device == "cuda" else 0,
            "max_ongoing_requests": 1024, "ingress_num_replicas": 4 if device == "cuda" else 1,
            "selector": {"port": 0, "stale_after_s": 600, "objective": objective or {}},
            "auth": {"enabled": False}}  # NOTE: the proxy binds loopback (see main())
    if router == "tinyserve":  # NOTE: router_kwargs go to whichever router class is chosen.
        args["router_kwargs"] = {"select_timeout_s": 0.05 if device == "cuda" else 1.0}
    t0 = time.perf_counter()
    serve.run(build_app(args), name=APP, route_prefix="/")
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"{http}/v1/models", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"router={router}: the app did not answer in 600 s") from None
            time.sleep(1)
    took = time.perf_counter() - t0
    print(f"== deployed router={router} in {took:.1f} s", flush=True)
    return took


def replay(http: str, model: str, workload: str, seed: int, policy: str, nonce: str,
           max_requests: int, num_replicas: int) -> dict[str, Any]:
    import openai

    # NOTE: a fresh client per replay: its connection pool binds to the replay's event loop.
    client = openai.AsyncOpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0,
                                timeout=600)
    base, rate, overrides = PLAN[workload]
    scale = base * num_replicas / 2
    w = build_workload(workload, seed, scale, **overrides)
    extra: dict[str, Any] = {"ignore_eos": True}
    if POLICIES[policy][1]:
        extra["routing_policy"] = POLICIES[policy][1]
    rep = Replayer(client, model, w, time_scale=1.0 / rate, max_requests=max_requests,
                   nonce=nonce, extra_body=extra)
    t0 = time.perf_counter()

    async def run() -> list[LoadRecord]:
        async with client:  # NOTE: closed on the replay's own loop, not after it ends.
            return await rep.run()

    with PoolSampler(num_replicas) as pools:
        records = asyncio.run(run())
    figures = pools.figures()
    timeline = figures.pop("timeline")  # NOTE: beside the records, not in the summary row
    row = {"workload": workload, "policy": policy, "router": POLICIES[policy][0], "seed": seed,
           "scale": scale, "rate_multiplier": rate, "overrides": overrides,
           "num_sent": len(rep.requests), "wall_s": time.perf_counter() - t0,
           **summarize(records), **tpot(records), **figures}
    print(f"   s{seed} {workload:24s} {policy:20s} n={row['num_requests']:5d} err={row.get('num_errors')}"
          f" ttft p50/p99 {row.get('ttft_p50_s', 0):.3f}/{row.get('ttft_p99_s', 0):.3f} s"
          f" hit {row.get('hit_ratio', 0):.3f} tok/s {row.get('throughput_tok_s', 0):.0f}"
          f" imb {row['imbalance']:.2f} kv {row['kv_usage_mean']:.2f}"
          f" ({row['wall_s']:.1f} s) {row['prompt_tokens_per_replica']}", flush=True)
    return {"summary": row, "records": [asdict(r) for r in records], "timeline": timeline,
            "args": {"workload": workload, "seed": seed, "scale": scale,
                     "time_scale": 1.0 / rate, "set": overrides, "max_requests": max_requests}}
