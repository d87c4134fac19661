"""Does the fragmentation term (alpha_fragmentation x F_total in C) change TTFT or hits?

    python -m benchmarks.frag_weight --seeds 0 1 --jobs 2 --out benchmarks/results/frag_weight

Runs TinyServe under KV pressure with ``alpha_fragmentation`` in ``--alphas`` (everything else
the defaults) and prints, per (workload, replicas), TTFT p50/p99, hit ratio, F_total,
preemptions and evicted blocks for each weight, medians over the seeds, with each figure's
ratio to alpha 0 (the term off) measured in the same run. KV pressure: ``b2b_saas`` (its pool
sized for 73% KV demand) and ``multi_turn_chat`` / ``toolbench`` on a pool of
``--pressure-blocks`` blocks per replica. Replicas report F_total every ``--sample-interval``
simulated seconds (the pools' own ``stats()``; the matrix default is 5 s).
Writes ``<out>.json`` (every run) and ``<out>.md`` (the table, generated from the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sim.runner import RunSpec, run_specs

FIGURES = ("ttft_p50_s", "ttft_p99_s", "hit_ratio", "f_total", "num_preemptions",
           "num_evicted_blocks")  # fmt: skip


def build(args: argparse.Namespace) -> list[RunSpec]:
    specs = []
    for wl in args.workloads:
        sim: dict[str, Any] = {"sample_interval_s": args.sample_interval, "max_sampled": 64}
        if wl != "b2b_saas":
            sim["num_blocks"] = args.pressure_blocks
        for a in args.alphas:
            for seed in args.seeds:
                specs.append(RunSpec(wl, "tinyserve", args.replicas, seed,
                                     objective=json.dumps({"alpha_fragmentation": a}),
                                     sim=json.dumps(sim), tag=f"alpha={a}"))  # fmt: skip
    return specs


def table(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table and its rows (medians over seeds, ratios to alpha 0 of the same cell)."""
    groups: dict[tuple[str, int, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        a = float(r["objective_overrides"]["alpha_fragmentation"])
        groups[(r["workload"], r["num_replicas"], a)].append(r)
    med = {k: {f: float(np.median([r[f] for r in v])) for f in FIGURES} for k, v in groups.items()}
    out, lines = [], [
        "| workload | replicas | alpha_fragmentation | TTFT p50 s | TTFT p99 s (x off) | "
        "hit ratio (pts vs off) | F_total | preemptions | evicted blocks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (wl, n, a), m in sorted(med.items()):
        off = med.get((wl, n, 0.0), m)
        ratio = m["ttft_p99_s"] / off["ttft_p99_s"] if off["ttft_p99_s"] else 1.0
        gap = 100 * (m["hit_ratio"] - off["hit_ratio"])
        out.append({"workload": wl, "num_replicas": n, "alpha_fragmentation": a, **m,
                    "ttft_p99_vs_off": ratio, "hit_points_vs_off": gap})  # fmt: skip
        lines.append(f"| {wl} | {n} | {a:g} | {m['ttft_p50_s']:.3f} | {m['ttft_p99_s']:.3f} "
                     f"({ratio:.3f}) | {m['hit_ratio']:.3f} ({gap:+.2f}) | {m['f_total']:.2f} | "
                     f"{m['num_preemptions']:.0f} | {m['num_evicted_blocks']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n", out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["b2b_saas", "multi_turn_chat", "toolbench"])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.1, 1.0, 10.0])
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--pressure-blocks", type=int, default=2048,
                    help="pool blocks per replica for the workloads other than b2b_saas")
    ap.add_argument("--sample-interval", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/frag_weight")
    args = ap.parse_args(argv)
    rows = run_specs(build(args), args.jobs, desc="frag_weight")
    md, agg = table(rows)
    print(md)
    cmd = "python -m benchmarks.frag_weight " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "runs": rows, "median": agg},
                                                   indent=1))  # fmt: skip
    out.with_suffix(".md").write_text(f"Command: `{cmd}`\n\n{md}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
