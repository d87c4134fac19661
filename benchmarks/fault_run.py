"""Faults mid-load on a two-node Ray cluster of this host: an LLM replica, a selection-service
replica, then a whole worker node are killed while mixed traffic runs.

    flock /tmp/tinyserve-heavy.lock python -m benchmarks.fault_run \
        --json benchmarks/results/faults_cpu.json --md benchmarks/results/faults_cpu.md

Cluster (``benchmarks.app_cluster``): head node = ingress + 2 selection replicas + LLM
replica; worker node = LLM replica; the tiny random checkpoint (SmolLM2's tokenizer), so the
run measures the cluster, not the model. Traffic: ``benchmarks.mixed_load`` with every
request good (streamed and not, chat and completions; cancellations and bad requests are the
soak's business). For each fault, from the moment it is injected:

- lost: requests that failed before anything streamed (target 0: retried on a live replica);
- cut_clean / cut_dirty: streams that had started and ended with an OpenAI error event then
  [DONE] / any other way (target: none dirty);
- first_probe_hit_s, full_strength_s, cache_aware_s: see ``benchmarks.fault_probe``.

The killed worker node is replaced by a fresh one (as an autoscaler would), so Serve can
place the lost replica again. Node death is detected by Ray's health checks (defaults: every
3 s, dead after 5 misses), which bounds how fast a killed node's streams can be failed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.app_cluster import (
    App,
    AppSpec,
    add_worker_node,
    each_replica,
    kill_replica,
    kill_worker_node,
    start_app,
    stop_app,
    wait_for,
)
from benchmarks.fault_probe import full_strength, num_selects, selector_views, wait_cache_aware
from benchmarks.mixed_load import Mix, MixedLoad, Outcome, count

FAULT_MIX = Mix(p_stream=0.6, p_chat=0.5, p_cancel=0.0, p_bad=0.0, max_tokens=(16, 48))


@dataclass(slots=True)
class FaultResult:
    fault: str
    target: str
    injected_at_s: float
    counts: dict[str, int]  # outcomes of requests in flight at or sent after the fault
    recovery: dict[str, Any]
    errors: list[str]

    @property
    def num_lost(self) -> int:
        return self.counts["lost"]


def _busiest_replica(app: App) -> tuple[str, str]:
    """(replica id, node id) of the LLM replica with the most requests in flight."""
    stats = each_replica(app, "stats")
    rid = max(stats, key=lambda r: stats[r]["num_inflight"])
    return rid, str(stats[rid]["node_id"])


Victim = tuple[str, str]  # (deployment, replica id) whose death a fault causes


def kill_llm_replica(app: App) -> Victim:
    rid, _ = _busiest_replica(app)
    kill_replica(app, "LLMReplica", rid)
    return "LLMReplica", rid


def kill_selection_replica(app: App) -> Victim:
    # NOTE: the one the routers use most (most Selects answered) is the one worth killing.
    selects = num_selects(app)
    rid = max(selects, key=lambda r: selects[r])
    kill_replica(app, "CacheSelector", rid)
    return "CacheSelector", rid


def kill_worker(app: App) -> Victim:
    """Kill the worker node that runs an LLM replica (with it), once that replica holds two
    requests (or after 30 s), then add a fresh node."""
    stats = each_replica(app, "stats")
    (rid, node), *_ = [(r, str(s["node_id"])) for r, s in sorted(stats.items())
                       if str(s["node_id"]) in app.workers]  # fmt: skip
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and (
            each_replica(app, "stats").get(rid, {}).get("num_inflight", 0) < 2):
        time.sleep(0.05)
    kill_worker_node(app, node)
    add_worker_node(app)
    return "LLMReplica", rid


FAULTS: dict[str, Callable[[App], Victim]] = {
    "llm_replica": kill_llm_replica,
    "selection_replica": kill_selection_replica,
    "worker_node": kill_worker,
}


def in_window(outcomes: list[Outcome], start: float, end: float) -> list[Outcome]:
    """Requests that were in flight at ``start`` or began before ``end``."""
    return [o for o in outcomes if o.end_s >= start and o.start_s < end]


def run_fault(app: App, load: MixedLoad, fault: str, settle_s: float = 5.0,
              timeout_s: float = 180.0) -> FaultResult:
    """Inject ``fault`` under the running ``load``, wait until routing is cache-aware again,
    keep the load ``settle_s`` more, and classify what was in flight or sent meanwhile."""
    wait_for(lambda: full_strength(app), timeout_s, "full strength before the fault")
    # NOTE: let requests pile up on the replicas, so the kill catches some mid-stream
    wait_for(lambda: sum(s["num_inflight"] for s in each_replica(app, "stats").values()) >= 3,
             60, "no requests in flight before the fault")  # fmt: skip
    t0 = time.time()
    victim = FAULTS[fault](app)
    recovery = wait_cache_aware(app, t0, timeout_s, victim)
    time.sleep(settle_s)
    window = in_window(load.outcomes, t0, time.time())
    bad = [o for o in window if o.status not in ("ok",)]
    return FaultResult(fault, "#".join(victim), t0, count(window), recovery,
                       [f"{o.status}: {o.error}" for o in bad][:20])


def table(results: list[FaultResult]) -> str:
    lines = ["| fault | requests | ok | lost before streaming | streams cut (clean / dirty) | "
             "victim gone (s) | first probe hit (s) | full strength (s) | "
             "cache-aware again (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        c, rec = r.counts, r.recovery

        def s(key: str, rec: dict[str, Any] = rec) -> str:
            return "n/a" if rec[key] is None else f"{rec[key]:.1f}"

        lines.append(f"| {r.fault} | {sum(c.values())} | {c['ok']} | {c['lost']} | "
                     f"{c['cut_clean']} / {c['cut_dirty']} | {s('victim_gone_s')} | "
                     f"{s('first_probe_hit_s')} | "
                     f"{s('full_strength_s')} | {s('cache_aware_s')} |")
    return "\n".join(lines)


def run_all(app: App, faults: list[str], concurrency: int = 6, seed: int = 0,
            settle_s: float = 5.0) -> tuple[list[FaultResult], dict[str, int]]:
    """Every fault in order under one load; returns the per-fault results and the counts of
    the whole run."""
    load = MixedLoad(app.http, app.model, app.key, concurrency, FAULT_MIX, seed)
    load.start(duration_s=3600.0)
    results: list[FaultResult] = []
    try:
        for fault in faults:
            results.append(run_fault(app, load, fault, settle_s))
    finally:
        outcomes = load.stop()
    return results, count(outcomes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    from benchmarks.tiny_model import make_tiny_checkpoint

    model = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="tinyserve-tiny-")))
    app = start_app(AppSpec(model=str(model), num_worker_nodes=1, default_max_tokens=32))
    try:
        wait_for(lambda: full_strength(app), 120, "full strength at start")
        start_views = selector_views(app)
        results, totals = run_all(app, args.faults, args.concurrency, args.seed)
    finally:
        stop_app(app)
    text = table(results)
    print(text)
    print(f"whole run: {totals}")
    if args.json:
        args.json.write_text(json.dumps({
            "faults": [{**asdict(r), "injected_at_s": r.injected_at_s} for r in results],
            "totals": totals, "selector_views_at_start": start_views,
            "config": {"concurrency": args.concurrency, "seed": args.seed,
                       "mix": asdict(FAULT_MIX), "topology": "head: ingress, 2 selection "
                       "replicas, 1 LLM replica; 1 worker node: 1 LLM replica"},
            "command": "python -m benchmarks.fault_run --faults " + " ".join(args.faults),
        }, indent=1))
    if args.md:
        args.md.write_text(text + f"\n\nwhole run: {totals}\n")


if __name__ == "__main__":
    main()
