"""Soak: mixed traffic against the CPU app for a long time, then integrity and memory.

    nice flock /tmp/tinyserve-heavy.lock python -m benchmarks.soak --duration-s 1800 \
        --json benchmarks/results/soak.json --md benchmarks/results/soak.md

Starts the app on a local Ray node (loopback HTTP only; SmolLM2 by default, ``--model tiny``
for the tiny random checkpoint), sends ``benchmarks.mixed_load`` traffic (chat and
completions, streamed and not, client cancellations mid-stream, some bad requests) from
``--concurrency`` closed-loop clients, bounded by ``--duration-s`` and ``--max-requests``,
and stops by itself. Every ``--sample-every-s`` it samples the RSS of each replica, ingress
and selection-service process. At the end, with no traffic left: ``check_integrity()`` on
every LLM replica and what each still holds (at rest: no request, no used block), and the
RSS slope of each process by least squares over the samples after ``--warmup-s`` (MB per
hour, plus last-sample / first-sample after warm-up). Prints a table, writes JSON (+ md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.app_cluster import App, AppSpec, each_replica, rss_by_role, start_app, stop_app
from benchmarks.app_cluster import wait_for as _wait_for
from benchmarks.mixed_load import Mix, MixedLoad, count

MB = 1024 * 1024


@dataclass(slots=True)
class SoakResult:
    duration_s: float
    num_requests: int
    counts: dict[str, int]
    by_kind: dict[str, int]
    integrity: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)  # {t_s, rss: {proc: bytes}}
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def integrity_clean(self) -> bool:
        return bool(self.integrity) and all(
            r["ok"] and r["num_used_blocks"] == 0 and r["num_requests"] == 0
            and r["num_inflight"] == 0 for r in self.integrity.values())  # fmt: skip


def memory_slopes(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, float]]:
    """Per process: least-squares RSS slope (MB/h) and first/last RSS (MB) over the samples
    taken after ``warmup_s`` (a process needs 3 such samples to get a slope)."""
    procs = sorted({p for s in samples for p in s["rss"]})
    out: dict[str, dict[str, float]] = {}
    for proc in procs:
        pts = [(s["t_s"], s["rss"][proc] / MB) for s in samples
               if s["t_s"] >= warmup_s and proc in s["rss"]]  # fmt: skip
        if len(pts) < 3:
            continue
        t = np.array([p[0] for p in pts])
        y = np.array([p[1] for p in pts])
        slope_per_s = float(np.polyfit(t, y, 1)[0]) if np.ptp(t) > 0 else 0.0
        out[proc] = {"slope_mb_per_hour": slope_per_s * 3600.0, "first_mb": float(y[0]),
                     "last_mb": float(y[-1]), "max_mb": float(y.max()),
                     "span_s": float(np.ptp(t)), "num_samples": len(pts)}  # fmt: skip
    return out


def soak(app: App, duration_s: float, max_requests: int = 0, concurrency: int = 4,
         sample_every_s: float = 30.0, warmup_s: float = 120.0, seed: int = 0,
         mix: Mix | None = None) -> SoakResult:
    """Run the traffic on ``app`` and collect the figures (the app keeps running)."""
    load = MixedLoad(app.http, app.model, app.key, concurrency, mix or Mix(), seed)
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    t0 = time.time()

    def sampler() -> None:
        while True:
            samples.append({"t_s": time.time() - t0, "rss": rss_by_role(app),
                            "num_requests": len(load.outcomes)})  # fmt: skip
            if stop.wait(sample_every_s):
                return

    thread = threading.Thread(target=sampler, name="soak-rss", daemon=True)
    thread.start()
    load.start(duration_s, max_requests)
    assert load._thread is not None
    load._thread.join(duration_s + 300.0)
    outcomes = load.stop()
    elapsed = time.time() - t0
    stop.set()
    thread.join(60)
    samples.append({"t_s": time.time() - t0, "rss": rss_by_role(app),
                    "num_requests": len(outcomes)})  # fmt: skip
    # NOTE: cancelled streams are aborted asynchronously: wait until nothing is in flight.
    _wait_for(lambda: all(r["num_inflight"] == 0 and r["num_requests"] == 0
                          for r in each_replica(app, "check_integrity").values()),
              60, "replicas still hold requests after the traffic stopped")  # fmt: skip
    integrity = each_replica(app, "check_integrity")
    by_kind: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.endpoint}/{'stream' if o.stream else 'plain'}/{o.intent}"
        by_kind[key] = by_kind.get(key, 0) + 1
    return SoakResult(
        duration_s=elapsed, num_requests=len(outcomes), counts=count(outcomes),
        by_kind=dict(sorted(by_kind.items())), integrity=integrity, samples=samples,
        memory=memory_slopes(samples, min(warmup_s, elapsed / 4)),
        config={"duration_s": duration_s, "max_requests": max_requests,
                "concurrency": concurrency, "sample_every_s": sample_every_s,
                "warmup_s": warmup_s, "seed": seed, "model": app.spec.model,
                "num_replicas": app.spec.num_replicas},
    )


def table(res: SoakResult) -> str:
    lines = [f"Soak: {res.num_requests} requests in {res.duration_s:.0f} s "
             f"(model {res.config.get('model')}, concurrency {res.config.get('concurrency')})",
             "", "| outcome | requests |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in res.counts.items()]
    lines += ["", "| kind | requests |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in res.by_kind.items()]
    lines += ["", "| replica | check_integrity | requests held | used blocks | cached blocks |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {rid} | {'clean' if r['ok'] else 'BROKEN: ' + r['error']} | "
              f"{r['num_requests']} | {r['num_used_blocks']} | {r['num_cached_blocks']} |"
              for rid, r in sorted(res.integrity.items())]  # fmt: skip
    lines += ["", "| process | RSS first (MB) | RSS last (MB) | max (MB) | slope (MB/h) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {p} | {m['first_mb']:.0f} | {m['last_mb']:.0f} | {m['max_mb']:.0f} | "
              f"{m['slope_mb_per_hour']:+.1f} |" for p, m in res.memory.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=1800.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--sample-every-s", type=float, default=30.0)
    ap.add_argument("--warmup-s", type=float, default=180.0)
    ap.add_argument("--model", default="default", help="'default' (SmolLM2) or 'tiny'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    model = args.model
    if model == "tiny":
        from benchmarks.tiny_model import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="tinyserve-tiny-"))))
    app = start_app(AppSpec(model=model, default_max_tokens=32))
    try:
        res = soak(app, args.duration_s, args.max_requests, args.concurrency,
                   args.sample_every_s, args.warmup_s, args.seed)  # fmt: skip
    finally:
        stop_app(app)
    res.config["model"] = args.model
    text = table(res)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({
            "duration_s": res.duration_s, "num_requests": res.num_requests,
            "counts": res.counts, "by_kind": res.by_kind, "integrity": res.integrity,
            "integrity_clean": res.integrity_clean(), "memory": res.memory,
            "samples": res.samples, "config": res.config,
            "command": "python -m benchmarks.soak " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if v is not None and k not in ("json", "md"))}, indent=1))  # fmt: skip
    if args.md:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
