"""A lower bound on TTFT per request that no routing policy can beat, and its p99 per workload.

    python -m benchmarks.ttft_floor --sizes 8 32 128 --seeds 0 1 \
        --routing benchmarks/results/routing_ttft.json --out benchmarks/results/ttft_floor

A request's floor is its own prefill alone on an idle replica (``StepTimeModel.prefill_time``,
chunked like the engine) of the prompt tokens that NO cache could hold when it arrives: blocks
(as chained prefixes) that no other request computed before. Every policy's TTFT is at least
that: steps only get longer with company, a hit needs an earlier computation of the block, and
at least one token is always computed. "Before" is generous so the bound stays valid:

- open-loop requests see every other request whose nominal arrival is not later (same-instant
  siblings count for each other), outputs included;
- closed-loop requests (``parent_id``: they arrive after their parent finishes, later than
  nominal) see every other request's blocks.

The p99 of per-request floors bounds the p99 of any policy's TTFTs from below (order statistics
of pointwise-larger samples). Where a baseline's p99 is already below 1.25x the floor, no policy
can reach 0.8x of it: that is measured, not assumed. Writes ``<out>.json`` / ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sim.calibration import DEFAULT_CALIBRATION, StepTimeModel, load_calibration
from benchmarks.sim.runner import DESIGN_REPLICAS
from benchmarks.workloads import WORKLOADS, SimRequest, Workload, build_workload


def _chain(req: SimRequest) -> list[int]:
    """Chained keys of the request's prompt blocks followed by its output blocks."""
    keys, parent = [], 0
    for block in req.prompt_blocks + req.output_blocks:
        parent = hash((parent, block))
        keys.append(parent)
    return keys


def floors(workload: Workload, model: StepTimeModel) -> dict[str, float]:
    """request_id -> lower bound on its TTFT (seconds)."""
    bs = workload.block_size
    chains = {r.request_id: _chain(r) for r in workload.requests}
    everyone: Counter[int] = Counter(k for keys in chains.values() for k in keys)
    prior: set[int] = set()
    cached: dict[str, int] = {}
    for _, group_iter in groupby(sorted(workload.requests, key=lambda r: r.arrival_s),
                                 key=lambda r: r.arrival_s):
        group = list(group_iter)
        together = Counter(k for r in group for k in chains[r.request_id])
        for r in group:
            keys, nb, n = chains[r.request_id], len(r.prompt_blocks), 0
            if r.parent_id is not None:
                while n < nb and everyone[keys[n]] >= 2:
                    n += 1
            else:
                while n < nb and (keys[n] in prior or together[keys[n]] >= 2):
                    n += 1
            cached[r.request_id] = n
        for r in group:
            prior.update(chains[r.request_id])
    out = {}
    for r in workload.requests:
        tokens = r.num_prompt_tokens(bs)
        hit = min(cached[r.request_id] * bs, (tokens - 1) // bs * bs)  # >= 1 token computed
        out[r.request_id] = model.prefill_time(tokens - hit, hit)
    return out


def _floor_p99(job: tuple[str, int, int, str]) -> float:
    wl, n, seed, calibration = job
    f = floors(build_workload(wl, seed, n / DESIGN_REPLICAS), load_calibration(Path(calibration)))
    return float(np.percentile(list(f.values()), 99))


def _best_cells(routing: Path) -> dict[tuple[str, int], dict[str, Any]]:
    data = json.loads(routing.read_text())
    return {(c["workload"], c["num_replicas"]): c for c in data["targets"]["cells"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["all"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[8, 32, 128])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--calibration", default=str(DEFAULT_CALIBRATION))
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--routing", default="", help="a routing_bench JSON to compare with")
    ap.add_argument("--out", default="benchmarks/results/ttft_floor")
    args = ap.parse_args(argv)
    workloads = list(WORKLOADS) if args.workloads == ["all"] else args.workloads
    cells = _best_cells(Path(args.routing)) if args.routing else {}
    jobs = [(wl, n, seed, args.calibration) for wl in workloads for n in args.sizes
            for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        p99 = dict(zip(jobs, pool.map(_floor_p99, jobs), strict=True))
    rows = []
    for wl in workloads:
        for n in args.sizes:
            p99s = [p99[(wl, n, seed, args.calibration)] for seed in args.seeds]
            row: dict[str, Any] = {"workload": wl, "num_replicas": n, "seeds": args.seeds,
                                   "floor_p99_s": statistics.median(p99s)}
            cell = cells.get((wl, n))
            if cell:
                best = cell["best_baseline_ttft_p99_s"]
                row.update(best_baseline=cell["best_baseline"], best_baseline_p99_s=best,
                           tinyserve_p99_s=cell["ttft_p99_s"],
                           best_over_floor=best / row["floor_p99_s"],
                           reachable_0p8=row["floor_p99_s"] <= 0.8 * best)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| workload | replicas | floor p99 s | best baseline (p99 s) | TinyServe p99 s | "
             "best / floor | 0.8x reachable |", "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if "best_baseline" in r:
            lines.append(f"| {r['workload']} | {r['num_replicas']} | {r['floor_p99_s']:.3f} | "
                         f"{r['best_baseline']} ({r['best_baseline_p99_s']:.3f}) | "
                         f"{r['tinyserve_p99_s']:.3f} | {r['best_over_floor']:.2f} | "
                         f"{'yes' if r['reachable_0p8'] else 'NO'} |")
        else:
            lines.append(f"| {r['workload']} | {r['num_replicas']} | {r['floor_p99_s']:.3f} | - | - | - | - |")
    md = "\n".join(lines) + "\n"
    print(md)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"command": "python -m benchmarks.ttft_floor " + " ".join(sys.argv[1:] if argv is None else argv),
         "calibration": args.calibration, "rows": rows}, indent=1))
    Path(args.out).with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
