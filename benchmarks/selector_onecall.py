"""Issue 19, the bound one-call Select (sixth pass) and the bytes-in/bytes-out Select (seventh
pass): before / now runs gathered into one results JSON and its README tables
(``readme_tables`` markers ``<marker>`` and ``<marker>-steps``; ``--marker``, default
``selector-onecall``).

- ``selector_bench.py --json`` runs (any R list), before and now, alternated by the caller:
  per R, the median and range of each figure (Select / Ping p50, hot-loop compute, core.select
  inside the serving process, closed-loop Select/s and server CPU per Select, fast lane, RSS);
- ``selector_select_profile.py --json`` runs: the per-step split of one Select, hot and with
  8 MiB written between calls; ``--profile-rate-before`` / ``--profile-rate-now``: the same
  with ``--rate`` (marks expiring as in a server), rendered under ``<marker>-steady``.

    python -m benchmarks.selector_onecall --before b1.json b2.json --now n1.json n2.json \
        --profile-before pb1.json --profile-now pn1.json \
        --out benchmarks/results/selector_cpu_onecall.json
    python -m benchmarks.selector_onecall --tables benchmarks/results/selector_cpu_onecall.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

README = Path(__file__).parent / "README.md"
# (label, getter of one R's row, format)
BENCH_ROWS: tuple[tuple[str, Callable[[dict[str, Any]], float | None], str], ...] = (
    ("Select / Ping p50, sequential gRPC", lambda r: r["select_over_ping_p50"], "{:.2f}"),
    ("Ping p50 (us)", lambda r: r["ping"]["p50_us"], "{:.0f}"),
    ("Select p50 (us)", lambda r: r["select"]["p50_us"], "{:.0f}"),
    ("Select - Ping p50 (us)", lambda r: r["select"]["p50_us"] - r["ping"]["p50_us"], "{:.0f}"),
    ("core.select CPU p50, hot loop (us)", lambda r: r["compute_core_cpu"]["p50_us"], "{:.0f}"),
    ("core.select CPU p99, hot loop (us)", lambda r: r["compute_core_cpu"]["p99_us"], "{:.0f}"),
    ("core.select in the serving process p50 (us)",
     lambda r: r["core_in_server"]["wall"]["p50_us"], "{:.0f}"),
    ("core.select in the serving process p99 (us)",
     lambda r: r["core_in_server"]["wall"]["p99_us"], "{:.0f}"),
    ("closed-loop gRPC Select/s", lambda r: r["throughput_select_rps"], "{:,.0f}"),
    ("server CPU per gRPC Select (us)",
     lambda r: r["throughput_cpu"]["select"]["server_cpu_us"], "{:.0f}"),
    ("fast lane Select/s", lambda r: (r.get("fast_lane") or {}).get("select_rps"), "{:,.0f}"),
    ("fast lane server CPU per Select (us)",
     lambda r: (r.get("fast_lane") or {}).get("server_cpu_us"), "{:.0f}"),
    ("RSS after population (MB)", lambda r: r["rss_mb"], "{:.0f}"),
)  # fmt: skip
STEPS = ("total", "decode", "select", "rank_fast - kernel", "kernel", "route",
         "select - rank_fast - route", "encode", "total - kernel")  # fmt: skip


def _cell(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    return f"{fmt.format(float(np.median(xs)))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def _values(runs: list[dict[str, Any]], r: int, get: Callable[..., float | None]) -> list[float]:
    out = []
    for run in runs:
        for row in run["results"]:
            v = get(row) if row["num_replicas"] == r else None
            if v is not None:
                out.append(float(v))
    return out


def bench_table(doc: dict[str, Any]) -> str:
    """Per R and figure: before / now medians (ranges in brackets)."""
    b, n = doc["before"], doc["now"]
    reps = sorted({row["num_replicas"] for run in n for row in run["results"]})
    lines = [f"| figure | R | before: median (range), {len(b)} runs | "
             f"now: median (range), {len(n)} runs |", "|---|---:|---|---|"]  # fmt: skip
    for label, get, fmt in BENCH_ROWS:
        for r in reps:
            bv, nv = _values(b, r, get), _values(n, r, get)
            if bv or nv:
                lines.append(f"| {label} | {r} | {_cell(bv, fmt)} | {_cell(nv, fmt)} |")
    return "\n".join(lines)


def steps_table(doc: dict[str, Any], key: str = "profile") -> str:
    """One Select's steps, p50 us, hot and with 8 MiB written between calls (``key``:
    "profile", or "profile_rate" for the ``--rate`` runs)."""
    pb, pn = doc.get(f"{key}_before", []), doc.get(f"{key}_now", [])
    lines = ["| step (p50 us) | hot: before | hot: now | cold: before | cold: now |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for step in STEPS:
        cells = []
        for mode in ("hot", "cold"):
            for runs in (pb, pn):
                src = [p[mode] if step == "total" else p[mode + "_steps"] for p in runs]
                # NOTE: the "before" tree's profile named its compiled call rank_and_route
                xs = [s[step]["p50_us"] for s in src if step in s]
                if step == "total - kernel":  # NOTE: the same for every tree: from the p50s
                    xs = [p[mode + "_steps"]["total"]["p50_us"] - p[mode + "_steps"]["kernel"][
                        "p50_us"] for p in runs]  # fmt: skip
                cells.append(f"{np.median(xs):.1f}" if xs else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    d = pn[0]["dispatch"] if pn else {}
    calls = ", ".join(f"{k} ({v['num_args']} args)" for k, v in d.get("calls", {}).items())
    db = pb[0]["dispatch"] if pb else {}
    calls_b = ", ".join(f"{k} ({v['num_args']} args)" for k, v in db.get("calls", {}).items())
    lines.append("")
    lines.append(f"Compiled calls from Python per Select: before {db.get('num_dispatches')} "
                 f"({calls_b}); now {d.get('num_dispatches')} ({calls}).")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--before", type=Path, nargs="*", default=[])
    p.add_argument("--now", type=Path, nargs="*", default=[])
    p.add_argument("--profile-before", type=Path, nargs="*", default=[])
    p.add_argument("--profile-now", type=Path, nargs="*", default=[])
    p.add_argument("--profile-rate-before", type=Path, nargs="*", default=[])
    p.add_argument("--profile-rate-now", type=Path, nargs="*", default=[])
    p.add_argument("--meta", default="{}", help="JSON object stored as the file's meta")
    p.add_argument("--out", type=Path, default=None, help="write the gathered runs here")
    p.add_argument("--tables", type=Path, default=None, help="render this file's tables")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true")
    p.add_argument("--marker", default="selector-onecall", help="README table markers' prefix")
    ns = p.parse_args(argv)
    if ns.out is not None:
        doc = {
            "meta": json.loads(ns.meta),
            "before": [json.loads(f.read_text()) for f in ns.before],
            "now": [json.loads(f.read_text()) for f in ns.now],
            "profile_before": [json.loads(f.read_text()) for f in ns.profile_before],
            "profile_now": [json.loads(f.read_text()) for f in ns.profile_now],
        }
        if ns.profile_rate_before or ns.profile_rate_now:
            doc["profile_rate_before"] = [json.loads(f.read_text()) for f in ns.profile_rate_before]
            doc["profile_rate_now"] = [json.loads(f.read_text()) for f in ns.profile_rate_now]
        ns.out.write_text(json.dumps(doc, indent=1))
        print(bench_table(doc))
        print()
        print(steps_table(doc))
        if "profile_rate_now" in doc:
            print()
            print(steps_table(doc, "profile_rate"))
    if ns.tables is not None:
        from benchmarks.readme_tables import replace_section, write_or_check

        doc = json.loads(ns.tables.read_text())
        text = ns.readme.read_text()
        new = replace_section(text, ns.marker, bench_table(doc))
        new = replace_section(new, f"{ns.marker}-steps", steps_table(doc))
        if "profile_rate_now" in doc:
            new = replace_section(new, f"{ns.marker}-steady", steps_table(doc, "profile_rate"))
        return write_or_check(ns.readme, text, new, ns.check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
