"""The selection service's tables in ``benchmarks/README.md``, generated from committed JSON
(``readme_tables.replace_section`` markers; ``--check``: exit 1 when the README differs).

- ``selector-ab``: medians of ``selector_median.py`` outputs, before -> now, per figure.
- ``selector-rpc``: ``selector_rpc.py``'s front ends side by side.

    python -m benchmarks.selector_tables \
        --ab benchmarks/results/selector_cpu_base_median.json \
             benchmarks/results/selector_cpu_median.json \
        --rpc benchmarks/results/selector_rpc_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.selector_report import TARGETS

README = Path(__file__).parent / "README.md"
# (figure, label, format)
AB_ROWS = (
    ("compute_p50_us", "core.select thread CPU p50, hot loop (us)", "{:.0f}"),
    ("compute_p99_us", "core.select thread CPU p99, hot loop (us)", "{:.0f}"),
    ("with_proto_p50_us", "+ protobuf decode / encode p50 (us)", "{:.0f}"),
    ("with_wire_p50_us", "+ wire codec decode / encode p50 (us)", "{:.0f}"),
    ("in_server_p50_us", "core.select inside the serving process p50 (us)", "{:.0f}"),
    ("in_server_p99_us", "core.select inside the serving process p99 (us)", "{:.0f}"),
    ("ping_p50_us", "Ping p50, sequential (us)", "{:.0f}"),
    ("select_p50_us", "Select p50, sequential (us)", "{:.0f}"),
    ("select_over_ping_p50", "Select / Ping p50", "{:.2f}"),
    ("select_rps_one_proc", "closed-loop Select/s, one process", "{:,.0f}"),
    ("ping_rps_one_proc", "closed-loop Ping/s, one process", "{:,.0f}"),
    ("select_server_cpu_us", "server CPU per Select, closed loop (us)", "{:.0f}"),
    ("ping_server_cpu_us", "server CPU per Ping, closed loop (us)", "{:.0f}"),
    ("ingest_wire_events_per_s", "ReportKV ingestion (events/s)", "{:,.0f}"),
    ("rss_mb", "RSS after population (MB)", "{:.0f}"),
)


def _cell(fig: dict[str, Any] | None, fmt: str) -> str:
    if fig is None or math.isnan(fig["median"]):
        return "-"
    runs = ", ".join(fmt.format(x) for x in fig["runs"])
    return f"{fmt.format(fig['median'])} ({runs})"


def ab_table(base: dict[str, Any], now: dict[str, Any]) -> str:
    """Before / now medians (runs in brackets) and the target where the issue sets one."""
    b, n = base["figures"], now["figures"]
    lines = ["| figure | before: median (runs) | now: median (runs) | target |",
             "|---|---|---|---|"]  # fmt: skip
    for key, label, fmt in AB_ROWS:
        target = TARGETS.get(key)
        t = fmt.format(target) if target is not None else ""
        lines.append(f"| {label} | {_cell(b.get(key), fmt)} | {_cell(n.get(key), fmt)} | {t} |")
    return "\n".join(lines)


def rpc_table(doc: dict[str, Any]) -> str:
    """One row per front end: latency, closed-loop rates, server CPU per call."""
    lines = ["| front end | Ping p50 us | Select p50 / p99 us | Select / Ping p50 | Ping/s | "
             "Select/s | server CPU us per Ping | per Select |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in doc["results"].items():
        lines.append(
            f"| {name} | {r['ping']['p50_us']:.0f} | {r['select']['p50_us']:.0f} / "
            f"{r['select']['p99_us']:.0f} | {r['select_over_ping_p50']:.2f} | "
            f"{r['ping_rps']:,.0f} | {r['select_rps']:,.0f} | {r['ping_server_cpu_us']:.0f} | "
            f"{r['select_server_cpu_us']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.readme_tables import replace_section, write_or_check

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ab", nargs=2, metavar=("BEFORE", "NOW"), help="selector_median JSONs")
    ap.add_argument("--rpc", help="selector_rpc JSON")
    ap.add_argument("--readme", default=str(README))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    path = Path(args.readme)
    text = new = path.read_text()
    if args.ab:
        base, now = (json.loads(Path(f).read_text()) for f in args.ab)
        new = replace_section(new, "selector-ab", ab_table(base, now))
    if args.rpc:
        new = replace_section(new, "selector-rpc", rpc_table(json.loads(Path(args.rpc).read_text())))
    return write_or_check(path, text, new, args.check)


if __name__ == "__main__":
    raise SystemExit(main())
