"""Weight sweep for the TinyServe objective (how the documented defaults are chosen).

    python -m benchmarks.sweep_weights --seeds 0 1 2 --sizes 8 --jobs 2 \
        --out benchmarks/results/sweep

Coordinate sweep around a centre configuration: each axis in ``AXES`` is varied alone (the
rest at the centre), over every workload in ``--workloads`` and every seed. A configuration's
score is the geometric mean over (workload, seed) of its TTFT p99 divided by the centre's TTFT
p99 on the same (workload, seed) (lower is better); configurations whose mean hit ratio is more
than 2 points below the best configuration's are not eligible. The winner of each axis is
combined into ``best`` and written with every row (``<out>.json``, ``<out>.md``); pass
``<out>_best.json`` to ``routing_bench --objective``. Never pick weights from one seed: the
default runs 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.sim.runner import RunSpec, objective_config, run_specs

CENTRE: dict[str, Any] = {"alpha_load": 30.0}
AXES: dict[str, list[Any]] = {
    "alpha_load": [1.0, 10.0, 30.0, 100.0, 300.0, 1000.0],
    "alpha_size": [0.0, 0.5, 2.0],
    "w": [[1.0, 0.5, 2.0, 0.5], [0.25, 0.125, 0.5, 0.125], [0.5, 0.25, 1.0, 0.25],
          [2.0, 1.0, 4.0, 1.0]],
    "pending_weight": [0.3, 0.8],
    "lambda_reward": [0.0, 0.5],
    "alpha_latency": [0.0, 0.25, 1.0],
}
DEFAULT_WORKLOADS = [
    "generated_shared_prefix", "multi_turn_chat", "sibling_bursts", "prefix_repetition",
]


def configs() -> list[tuple[str, dict[str, Any]]]:
    """(label, overrides) for the centre and every one-axis variation (deduplicated)."""
    def effective(cfg: dict[str, Any]) -> str:
        return json.dumps(dataclasses.asdict(objective_config(cfg)), sort_keys=True)

    out: list[tuple[str, dict[str, Any]]] = [("centre", dict(CENTRE))]
    seen = {effective(CENTRE)}
    for axis, values in AXES.items():
        for v in values:
            cfg = {**CENTRE, axis: v}
            key = effective(cfg)
            if key not in seen:
                seen.add(key)
                out.append((f"{axis}={v}", cfg))
    return out


def score(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: geomean TTFT p99 ratio to the centre, mean hit ratio, eligibility."""
    centre = {(r["workload"], r["num_replicas"], r["seed"]): r["ttft_p99_s"]
              for r in rows if r["tag"] == "centre"}
    by_cfg: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cfg[r["tag"]].append(r)
    table = []
    for tag, rs in by_cfg.items():
        logs = [math.log(r["ttft_p99_s"] / centre[(r["workload"], r["num_replicas"], r["seed"])])
                for r in rs]
        table.append({"tag": tag, "objective": rs[0]["objective_overrides"],
                      "ttft_p99_ratio_geomean": math.exp(sum(logs) / len(logs)),
                      "hit_ratio_mean": sum(r["hit_ratio"] for r in rs) / len(rs),
                      "num_runs": len(rs)})
    best_hit = max(t["hit_ratio_mean"] for t in table)
    for t in table:
        t["eligible"] = t["hit_ratio_mean"] >= best_hit - 0.02
    return sorted(table, key=lambda t: t["ttft_p99_ratio_geomean"])


def combine(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Centre with, per axis, the value of that axis' best eligible configuration."""
    best = dict(CENTRE)
    for axis in AXES:
        cands = [t for t in table if t["eligible"] and (t["tag"].startswith(f"{axis}=")
                                                        or t["tag"] == "centre")]
        if cands:
            winner = min(cands, key=lambda t: t["ttft_p99_ratio_geomean"])
            best[axis] = winner["objective"].get(axis, CENTRE.get(axis))
            if best[axis] is None:
                best.pop(axis)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS)
    ap.add_argument("--sizes", nargs="+", type=int, default=[8])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/sweep")
    args = ap.parse_args(argv)
    specs = [RunSpec(wl, "tinyserve", n, seed, objective=json.dumps(cfg), tag=label)
             for label, cfg in configs() for n in args.sizes for wl in args.workloads
             for seed in args.seeds]
    t0 = time.perf_counter()
    rows = run_specs(specs, args.jobs, desc="sweep_weights",
                     partial=Path(args.out).with_suffix(".partial.jsonl"))
    table = score(rows)
    best = combine(table)
    lines = ["| config | TTFT p99 / centre (geomean) | mean hit ratio | eligible |",
             "|---|---:|---:|---|"]
    lines += [f"| {t['tag']} | {t['ttft_p99_ratio_geomean']:.3f} | {t['hit_ratio_mean']:.3f} | "
              f"{'yes' if t['eligible'] else 'no'} |" for t in table]
    text = "\n".join(lines) + f"\n\nCombined best: `{json.dumps(best)}`\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.sweep_weights " + " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "wall_s": time.perf_counter() - t0, "centre": CENTRE, "axes": AXES,
         "table": table, "best": best, "runs": rows}, indent=1))
    out.with_suffix(".md").write_text(f"Command: `{command}`\n\n" + text)
    Path(f"{out}_best.json").write_text(json.dumps({"objective": best}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
