"""Where does a policy's TTFT tail come from? Queueing on a hot replica, or recompute.

    python -m benchmarks.tail_breakdown --workloads tool_agent multi_turn_chat \
        --policies tinyserve dynamo_cost --seeds 0 1 --out benchmarks/results/tail_breakdown

Runs the simulator with light instrumentation (nothing in the product changes): for every
request it records the admission time on its replica (first successful ``allocate_slots``), so
TTFT splits into ``wait`` (arrival -> admission: queueing behind other requests on that
replica) and ``compute`` (admission -> first token: its own uncached prefill, chunked and
batched with others); and, at routing time, what the router saw (queued tokens of the chosen
replica vs the least-loaded candidate; matched blocks on the chosen replica vs the best match
anywhere) and the true prefill work waiting on the chosen replica. The report compares the
requests at or above the run's TTFT p99 with all requests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

import benchmarks.sim.policies  # noqa: F401  (registers load_only)
from benchmarks.sim.calibration import DEFAULT_CALIBRATION, load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig
from benchmarks.sim.replica import SeqState, SimReplica
from benchmarks.sim.runner import DESIGN_REPLICAS, _workload, objective_config
from benchmarks.workloads.types import SimRequest


class AdmissionSim(ClusterSim):
    """ClusterSim that remembers each request's admission time (first successful admit)."""

    def __init__(self, config: SimConfig, workload: Any) -> None:
        super().__init__(config, workload)
        self.admitted: dict[str, float] = {}
        for r in self.replicas:
            self._wrap(r)

    def _wrap(self, replica: SimReplica) -> None:
        admit, sim = replica._admit, self

        def traced(s: SeqState, budget: int) -> int | None:
            n = admit(s, budget)
            if n is not None:
                sim.admitted.setdefault(s.req.request_id, sim.now)
            return n

        replica._admit = traced  # type: ignore[method-assign]


class _TracedSim(AdmissionSim):
    """AdmissionSim that also remembers, per request, the router's view."""

    def __init__(self, config: SimConfig, workload: Any) -> None:
        self.routed: dict[str, dict[str, float]] = {}
        super().__init__(config, workload)

    def _on_arrival(self, req: SimRequest) -> None:
        self._deliver_due()
        table = self.core._table
        slots, ids = table.live()
        queued = table.cols["num_queued_tokens"][slots].astype(np.float64)
        hashes = self._memo.hashes(req.prompt_blocks)
        match = self.core._index.match(hashes, table.live_mask)
        matched = match.arrays(table.capacity)[0][slots]
        before = {r.replica_id: len(r.waiting) for r in self.replicas}
        super()._on_arrival(req)
        chosen = next(r for r in self.replicas if len(r.waiting) > before[r.replica_id])
        i = ids.index(chosen.replica_id)
        # True prefill tokens ahead of this request on the chosen replica (cached or not).
        ahead = sum(s.prefill_target - s.num_computed for s in chosen.running)
        ahead += sum(s.prefill_target for s in list(chosen.waiting)[:-1])
        self.routed[req.request_id] = {
            "queued_seen": float(queued[i]), "queued_min": float(queued.min()),
            "queued_rank": float((queued < queued[i]).sum()),
            "matched": float(matched[i]), "matched_best": float(matched.max()),
            "prompt_blocks": float(len(req.prompt_blocks)), "prefill_ahead": float(ahead),
            "waiting_ahead": float(len(chosen.waiting) - 1),
        }


def breakdown(workload: str, policy: str, replicas: int, seed: int,
              objective: dict[str, Any]) -> dict[str, Any]:
    wl = _workload(workload, seed, replicas / DESIGN_REPLICAS, "{}")
    cfg = SimConfig(num_replicas=replicas, policy=policy,
                    model=load_calibration(Path(DEFAULT_CALIBRATION)),
                    objective=objective_config(objective if policy == "tinyserve" else {}),
                    seed=seed)
    sim = _TracedSim(cfg, wl)
    summary = sim.run()
    bs = wl.block_size
    rows = []
    for rec in sim.records:
        info = sim.routed.get(rec.request_id)
        if info is None:
            continue
        admit = sim.admitted.get(rec.request_id, rec.arrival_s)
        rows.append({
            "ttft": rec.ttft_s, "wait": admit - rec.arrival_s, "compute": rec.first_token_s - admit,
            "miss_tokens": rec.num_prompt_tokens - rec.num_cached_tokens,
            "lost_match_tokens": (info["matched_best"] - info["matched"]) * bs, **info,
        })
    ttft = np.asarray([r["ttft"] for r in rows])
    p99 = float(np.percentile(ttft, 99))
    tail = [r for r in rows if r["ttft"] >= p99]

    def mean(sel: list[dict[str, float]], key: str) -> float:
        return float(np.mean([r[key] for r in sel])) if sel else 0.0

    def frac(sel: list[dict[str, float]], pred: Any) -> float:
        return float(np.mean([bool(pred(r)) for r in sel])) if sel else 0.0

    keys = ("ttft", "wait", "compute", "miss_tokens", "lost_match_tokens", "queued_seen",
            "queued_min", "prefill_ahead", "waiting_ahead")
    out: dict[str, Any] = {
        "workload": workload, "policy": policy, "num_replicas": replicas, "seed": seed,
        "ttft_p99_s": summary.ttft_p99_s, "hit_ratio": summary.hit_ratio,
        "imbalance": summary.imbalance, "num_tail": len(tail),
    }
    for group, sel in (("all", rows), ("tail", tail)):
        for k in keys:
            out[f"{group}_{k}"] = mean(sel, k)
        out[f"{group}_wait_share"] = out[f"{group}_wait"] / max(out[f"{group}_ttft"], 1e-9)
        out[f"{group}_not_least_loaded"] = frac(sel, lambda r: r["queued_rank"] > 0)
        out[f"{group}_lost_match"] = frac(sel, lambda r: r["matched"] < r["matched_best"])
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    head = ("| workload | policy | seed | p99 s | imb | tail: ttft s | wait s | compute s | wait share"
            " | miss tok | prefill ahead tok | queued seen / min tok | not least-loaded | lost match"
            " | all: wait share | miss tok |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in results:
        lines.append(
            f"| {r['workload']} | {r['policy']} | {r['seed']} | {r['ttft_p99_s']:.3f} | "
            f"{r['imbalance']:.2f} | {r['tail_ttft']:.3f} | {r['tail_wait']:.3f} | "
            f"{r['tail_compute']:.3f} | {r['tail_wait_share']:.2f} | {r['tail_miss_tokens']:.0f} | "
            f"{r['tail_prefill_ahead']:.0f} | {r['tail_queued_seen']:.0f} / "
            f"{r['tail_queued_min']:.0f} | {r['tail_not_least_loaded']:.2f} | "
            f"{r['tail_lost_match']:.2f} | {r['all_wait_share']:.2f} | {r['all_miss_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["tool_agent", "multi_turn_chat",
                                                       "generated_shared_prefix"])
    ap.add_argument("--policies", nargs="+", default=["tinyserve", "dynamo_cost",
                                                      "llmd_weighted", "preble"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[8])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--objective", default="", help="JSON file of ObjectiveConfig overrides")
    ap.add_argument("--out", default="benchmarks/results/tail_breakdown")
    args = ap.parse_args(argv)
    objective = json.loads(Path(args.objective).read_text()) if args.objective else {}
    objective = objective.get("objective", objective)
    results = []
    for n in args.sizes:
        for wl in args.workloads:
            for seed in args.seeds:
                for p in args.policies:
                    results.append(breakdown(wl, p, n, seed, objective))
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                      for k, v in results[-1].items()}), flush=True)
    table = markdown(results)
    print(table)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
