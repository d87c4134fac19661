"""Routing imbalance in the simulator, gpu_ab's plan with the real app's chat-template header.

The real app renders every prompt through a chat template, so all requests of a replay share
its first few blocks (the template's opening plus the replay's nonce: 47 tokens, 3 blocks, on
gpu_ab's b2b_saas replays, the median real - spec prompt length). The workload specs have no
such header, and neither had the weight sweeps. This benchmark prepends ``--header-blocks``
shared blocks to every prompt (a conversation's later turns carry it through their history)
and replays gpu_ab's plan (``benchmarks.gpu_ab_plan.PLAN``: same scale at 2 replicas, rate,
builder overrides, pool size) for several seeds, for the baselines and for TinyServe objective
variants, all in one run. Figures per replay: imbalance as gpu_ab measures it (max / mean
prompt tokens routed per replica), the simulator's own (prefill + decode tokens run),
prefix-hit token ratio, TTFT p50/p99, output tokens/s. ``--trace`` keeps the per-candidate
score terms of one TinyServe replay's first decisions (who won, and why).

    python -m benchmarks.sim_imbalance --seeds 0 1 2 3 4 \\
        --variant 'unscaled={"match_scaled_features": false}' \\
        --out benchmarks/results/gpu_ab/sim_b2b_imbalance
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import benchmarks.sim.policies  # noqa: F401  (registers the benchmark-only policies)
from benchmarks.gpu_ab_plan import PLAN
from benchmarks.sim.calibration import load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig
from benchmarks.sim_vs_real import scaled
from benchmarks.workloads import Workload, build_workload
from cluster.selector.objective_settings import objective_from_mapping

CALIBRATION = "benchmarks/sim/calibration/h100_llama1b_measured.json"
WORKLOADS = ["b2b_saas", "multi_turn_chat", "tool_agent", "generated_shared_prefix"]
POLICIES = ["tinyserve", "llmd_weighted", "sglang_cache_aware"]
# NOTE: gsp at x3 saturated every policy on the GPU (README, "Rates and results"); x1.5 is the
# rate of its separate H200 run.
RATE = {"generated_shared_prefix": 1.5}
METRICS = ("imbalance", "work_imbalance", "hit_ratio", "ttft_p50_s", "ttft_p99_s",
           "throughput_tok_s")


def planned_workload(name: str, seed: int, replicas: int, header_blocks: int) -> Workload:
    """gpu_ab's replay of ``name`` (arrivals compressed by its rate) with ``header_blocks``
    shared blocks in front of every prompt."""
    base, rate, overrides = PLAN[name]
    rate = RATE.get(name, rate)
    w = build_workload(name, seed, base * replicas / 2, **overrides)
    top = 1 + max(c for r in w.requests for c in r.prompt_blocks + r.output_blocks)
    header = tuple(range(top, top + header_blocks))
    reqs = [replace(r, arrival_s=r.arrival_s / rate, think_time_s=r.think_time_s / rate,
                    prompt_blocks=header + r.prompt_blocks) for r in w.requests]
    return Workload(w.name, seed, reqs, dict(w.params, rate_multiplier=rate,
                                             header_blocks=header_blocks),
                    w.stages, w.kv_blocks_per_replica, w.block_size).sort()


def trace_rows(sim: ClusterSim, limit: int) -> list[dict[str, Any]]:
    """Wraps ``sim.core.select`` (before ``run``) to keep the first ``limit`` decisions with
    every candidate's terms (needs ``SimConfig(reference=True)``: the full ranking)."""
    rows: list[dict[str, Any]] = []
    routed: Counter[str] = Counter()
    select = sim.core.select

    def traced(request: Any, *args: Any, **kwargs: Any) -> Any:
        sel = select(request, *args, **kwargs)
        routed[sel.ranked[0].replica_id] += 1
        if len(rows) < limit:
            rows.append({
                "t_s": round(sim.now, 4), "request_id": request.request_id,
                "num_prompt_blocks": request.num_prompt_blocks, "routed": dict(routed),
                "candidates": [{"replica_id": r.replica_id, "score": round(r.score, 4),
                                **{k: round(getattr(r.terms, k), 4) for k in (
                                    "utility", "load_cost", "latency_cost", "frequency",
                                    "similarity", "locality", "reward")},
                                "num_matched_blocks": r.terms.num_matched_blocks,
                                "num_pending_blocks": r.terms.num_pending_blocks}
                               for r in sel.ranked]})
        return sel

    sim.core.select = traced  # type: ignore[method-assign]
    return rows


def replay(cfg: SimConfig, w: Workload, trace: int = 0) -> dict[str, Any]:
    sim = ClusterSim(cfg, w)
    rows = trace_rows(sim, trace) if trace else []
    s = sim.run()
    prompt: Counter[str] = Counter()
    for rec in sim.records:
        prompt[rec.replica_id] += rec.num_prompt_tokens
    vals = [prompt.get(r.replica_id, 0) for r in sim.replicas]
    out = {"imbalance": max(vals) / statistics.mean(vals), "work_imbalance": s.imbalance,
           "hit_ratio": s.request_hit_ratio, "ttft_p50_s": s.ttft_p50_s,
           "ttft_p99_s": s.ttft_p99_s, "throughput_tok_s": s.throughput_tok_s,
           "num_requests": s.num_requests, "prompt_tokens_per_replica": vals}
    if trace:
        out["trace"] = rows
    return out


def table(rows: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """Mean over seeds per (workload, label): imbalance, hit ratio, TTFT p99."""
    lines = ["| workload | policy | seeds | imbalance | work imbalance | hit ratio | TTFT p50 (s) "
             "| TTFT p99 (s) | output tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        for label in labels:
            cell = [r for r in rows if r["workload"] == wl and r["label"] == label]
            if not cell:
                continue
            m = {k: statistics.mean(r[k] for r in cell) for k in METRICS}
            lines.append(f"| {wl} | {label} | {len(cell)} | {m['imbalance']:.2f} | "
                         f"{m['work_imbalance']:.2f} | {m['hit_ratio']:.3f} | "
                         f"{m['ttft_p50_s']:.3f} | {m['ttft_p99_s']:.3f} | "
                         f"{m['throughput_tok_s']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=sorted(PLAN))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL=JSON: also run tinyserve with these objective overrides")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--header-blocks", type=int, default=3)
    ap.add_argument("--calibration", default=CALIBRATION)
    ap.add_argument("--step-time-factor", type=float, default=1.0,
                    help="every step time x this (2: two replicas taking turns on one GPU)")
    ap.add_argument("--num-blocks", type=int, default=19_521, help="pool per replica (gpu_ab's)")
    ap.add_argument("--trace", type=int, default=0,
                    help="keep the first N decisions of each tinyserve b2b_saas replay")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    model = scaled(load_calibration(args.calibration), args.step_time_factor)
    runs: list[tuple[str, str, dict[str, Any]]] = [(p, p, {}) for p in args.policies]
    for item in args.variant:
        label, _, raw = item.partition("=")
        runs.append((f"tinyserve[{label}]", "tinyserve", json.loads(raw)))
    rows: list[dict[str, Any]] = []
    for wl in args.workloads:
        for seed in args.seeds:
            w = planned_workload(wl, seed, args.replicas, args.header_blocks)
            for label, policy, overrides in runs:
                trace = args.trace if policy == "tinyserve" and wl == "b2b_saas" else 0
                cfg = SimConfig(num_replicas=args.replicas, policy=policy, model=model,
                                num_blocks=args.num_blocks, eviction="adaptive",
                                objective=objective_from_mapping(overrides) if overrides else None,
                                reference=bool(trace))
                row = {"workload": wl, "seed": seed, "label": label, "policy": policy,
                       "objective": overrides, **replay(cfg, w, trace)}
                rows.append(row)
                print(f"{wl:24s} s{seed} {label:34s} imb {row['imbalance']:.2f} "
                      f"hit {row['hit_ratio']:.3f} p99 {row['ttft_p99_s']:.3f}", flush=True)
    labels = [r[0] for r in runs]
    md = "\n".join([
        f"# Simulated routing imbalance: gpu_ab's plan, {args.replicas} replicas, "
        f"{args.header_blocks} shared header blocks", "",
        f"Calibration `{args.calibration}` x {args.step_time_factor}, {args.num_blocks} blocks "
        f"per replica (adaptive eviction), seeds {args.seeds}. Imbalance: max / mean prompt "
        "tokens routed per replica (gpu_ab's measure); work imbalance: prefill + decode tokens "
        "run. Means over seeds.", "", *table(rows, labels), ""])
    print(md)
    if args.out:
        out = Path(args.out)
        meta = {k: v for k, v in vars(args).items() if k != "out"}
        out.with_suffix(".json").write_text(json.dumps({"args": meta, "runs": rows}, indent=1))
        out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
