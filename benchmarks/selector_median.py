"""Medians over several ``selector_bench.py --json`` runs: the issue-19 figures and the CPU
per call, per run and their median (what the README quotes).

    python benchmarks/selector_median.py results/run1.json results/run2.json results/run3.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.selector_report import TARGETS

FIGURES = (
    ("compute_p99_us", lambda r: r["compute_core_cpu"]["p99_us"]),
    ("compute_p50_us", lambda r: r["compute_core_cpu"]["p50_us"]),
    ("with_wire_p50_us", lambda r: r.get("compute_with_wire", {}).get("p50_us", float("nan"))),
    ("with_proto_p50_us", lambda r: r.get("compute_with_proto", {}).get("p50_us", float("nan"))),
    ("in_server_p50_us", lambda r: r["core_in_server"]["wall"]["p50_us"]),
    ("in_server_p99_us", lambda r: r["core_in_server"]["wall"]["p99_us"]),
    ("ping_p50_us", lambda r: r["ping"]["p50_us"]),
    ("select_p50_us", lambda r: r["select"]["p50_us"]),
    ("select_over_ping_p50", lambda r: r["select_over_ping_p50"]),
    ("select_rps_one_proc", lambda r: r["throughput_select_rps"]),
    ("ping_rps_one_proc", lambda r: r["throughput_ping_rps"]),
    ("select_server_cpu_us", lambda r: r["throughput_cpu"]["select"]["server_cpu_us"]),
    ("ping_server_cpu_us", lambda r: r["throughput_cpu"]["ping"]["server_cpu_us"]),
    ("select_client_cpu_us", lambda r: r["throughput_cpu"]["select"]["client_cpu_us"]),
    ("ping_client_cpu_us", lambda r: r["throughput_cpu"]["ping"]["client_cpu_us"]),
    ("ingest_wire_events_per_s", lambda r: r["ingest_wire_events_per_s"]),
    ("rss_mb", lambda r: r["rss_mb"]),
)


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """figure -> {"runs": [...], "median": x} at each run's largest R."""
    rows = [max(run["results"], key=lambda r: r["num_replicas"]) for run in runs]
    out = {}
    for name, get in FIGURES:
        xs = [float(get(r)) for r in rows]
        out[name] = {"runs": xs, "median": float(np.median(xs))}
    scal = [run["issue19"].get("scaling", {}) for run in runs]
    for n in sorted({n for s in scal for n in s}, key=int):
        xs = [float(s[n]) for s in scal if n in s]
        out[f"scaling_N{n}"] = {"runs": xs, "median": float(np.median(xs))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args(argv)
    figs = medians([json.loads(f.read_text()) for f in ns.runs])
    print(f"{'figure':<26} {'median':>10}  {'target':>8}  runs")
    for name, v in figs.items():
        target = TARGETS.get(name.replace("scaling_N4", "scaling_at_4"))
        t = f"{target:>8g}" if target is not None else " " * 8
        runs = " ".join(f"{x:.4g}" for x in v["runs"])
        print(f"{name:<26} {v['median']:>10.4g}  {t}  {runs}")
    if ns.json is not None:
        ns.json.write_text(json.dumps({"runs": [str(f) for f in ns.runs], "figures": figs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
