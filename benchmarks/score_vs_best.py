"""Score TinyServe objective configurations against the best baseline (issue 7's headline).

    python -m benchmarks.score_vs_best ROWS... --out benchmarks/results/sweep_evict

ROWS are routing_bench outputs (.json or .partial.jsonl) that hold the baselines and one or
more ``tinyserve`` configurations (told apart by their ``objective_overrides``), over the same
(workload, cluster size, seed) cells. Per configuration and cell: TinyServe's TTFT p99 over the
best baseline's, and its hit ratio minus the best baseline hit ratio (points). Per
configuration and workload: the geometric mean and the worst ratio over seeds and sizes, the
mean hit gap; overall: the geometric mean. Writes ``<out>.json`` and ``<out>.md``, prints the
table. Unlike ``sweep_weights`` (each axis against a centre configuration) this ranks every
configuration by the target itself, so the choice is never made on one seed or one workload.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.sim.runner import load_rows

Cell = tuple[str, int, int]  # workload, num_replicas, seed


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def score(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per TinyServe configuration, best (lowest overall geomean) first."""
    baselines: dict[Cell, list[dict[str, Any]]] = defaultdict(list)
    configs: dict[str, dict[Cell, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        cell = (r["workload"], r["num_replicas"], r["seed"])
        if r["policy"] == "tinyserve":
            configs[json.dumps(r["objective_overrides"], sort_keys=True)][cell] = r
        else:
            baselines[cell].append(r)
    out = []
    for cfg, cells in configs.items():
        ratios: dict[str, list[float]] = defaultdict(list)
        gaps: dict[str, list[float]] = defaultdict(list)
        for cell, r in cells.items():
            base = baselines.get(cell)
            if not base:
                continue
            ratios[cell[0]].append(r["ttft_p99_s"] / min(b["ttft_p99_s"] for b in base))
            gaps[cell[0]].append(100.0 * (r["hit_ratio"] - max(b["hit_ratio"] for b in base)))
        if not ratios:
            continue
        per_workload = {
            wl: {"geomean": _geomean(v), "worst": max(v), "hit_gap_points": sum(gaps[wl]) / len(v),
                 "cells": len(v)}
            for wl, v in sorted(ratios.items())
        }
        every = [x for v in ratios.values() for x in v]
        out.append({"objective": json.loads(cfg), "geomean": _geomean(every), "cells": len(every),
                    "workloads": per_workload})
    return sorted(out, key=lambda s: s["geomean"])


def to_markdown(scores: list[dict[str, Any]]) -> str:
    workloads = sorted({wl for s in scores for wl in s["workloads"]})
    head = "| objective overrides | geomean | " + " | ".join(workloads) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(workloads)]
    for s in scores:
        cols = []
        for wl in workloads:
            w = s["workloads"].get(wl)
            cols.append(f"{w['geomean']:.2f} / {w['worst']:.2f} ({w['hit_gap_points']:+.1f})"
                        if w else "-")
        lines.append(f"| `{json.dumps(s['objective'])}` | {s['geomean']:.3f} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + (
        "\n\nCells: TTFT p99 / best baseline, geomean / worst over seeds and sizes "
        "(hit ratio minus the best baseline's, points).\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", help="routing_bench outputs (.json / .partial.jsonl)")
    ap.add_argument("--out", default="benchmarks/results/score_vs_best")
    args = ap.parse_args(argv)
    rows = [r for path in args.rows for r in load_rows(path)]
    scores = score(rows)
    if not scores:
        raise SystemExit("no tinyserve row shares a (workload, size, seed) cell with a baseline")
    md = to_markdown(scores)
    print(md)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"inputs": args.rows, "scores": scores}, indent=1))
    Path(args.out).with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
