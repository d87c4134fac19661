"""selector_bench's report: the issue-19 figures with their targets, and the tables."""

from __future__ import annotations

from typing import Any

TARGETS = {
    "compute_p99_us": 100.0,
    "select_over_ping_p50": 1.2,
    "select_rps_one_proc": 10_000.0,
    "select_rps_fast_lane": 10_000.0,
    "scaling_at_4": 0.8,
    "ingest_wire_events_per_s": 200_000.0,
    "rss_mb": 1024.0,
}


def issue_figures(rows: list[dict[str, Any]], scaling: dict[str, Any] | None) -> dict[str, Any]:
    """The issue-19 figures at the largest R, each with its target and whether it is met."""
    r = max(rows, key=lambda x: x["num_replicas"])
    figs: dict[str, Any] = {
        "num_replicas": r["num_replicas"],
        "compute_p99_us": r["compute_core_cpu"]["p99_us"],
        "select_over_ping_p50": r["select_over_ping_p50"],
        "select_rps_one_proc": r["throughput_select_rps"],
        "ingest_wire_events_per_s": min(x["ingest_wire_events_per_s"] for x in rows),
        "rss_mb": r["rss_mb"],
    }
    if r.get("fast_lane"):
        # NOTE: the same process's Select over the fast lane (no gRPC), closed loop
        figs["select_rps_fast_lane"] = r["fast_lane"]["select_rps"]
        figs["fast_lane_server_cpu_us"] = r["fast_lane"]["server_cpu_us"]
    if scaling is not None:
        by_n = {x["num_procs"]: x for x in scaling["rows"]}
        figs["select_rps_one_proc"] = max(figs["select_rps_one_proc"], by_n[1]["select_rps"])
        figs["scaling"] = {n: x["scaling"] for n, x in by_n.items()}
        if 4 in by_n:
            figs["scaling_at_4"] = by_n[4]["scaling"]
    lower_is_better = {"compute_p99_us", "select_over_ping_p50", "rss_mb"}
    figs["met"] = {
        k: (figs[k] <= v if k in lower_is_better else figs[k] >= v)
        for k, v in TARGETS.items()
        if k in figs
    }
    return figs


def figures_table(figs: dict[str, Any]) -> str:
    lines = [f"issue 19 figures at R = {figs['num_replicas']} (target, met):"]
    for k, v in TARGETS.items():
        if k in figs:
            lines.append(f"  {k:<26} {figs[k]:>12.2f}   target {v:g}   {'MET' if figs['met'][k] else 'NOT MET'}")
    for n, x in figs.get("scaling", {}).items():
        lines.append(f"  scaling N={n:<17} {x:>12.2f}   (Select/s / (N x one process))")
    return "\n".join(lines)


def cpu_table(rows: list[dict[str, Any]]) -> str:
    """Closed-loop CPU per call on each side (what limits the rate) and the per-core rate."""
    head = (
        f"{'R':>4} {'call':>6} {'rps':>7} {'server cpu us/call':>18} {'server cores':>12} "
        f"{'client cpu us/call':>18} {'client cores':>12} {'calls/s per server core':>23}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        for m, x in r["throughput_cpu"].items():
            lines.append(
                f"{r['num_replicas']:>4} {m:>6} {x['rps']:>7.0f} {x['server_cpu_us']:>18.0f} "
                f"{x['server_cores']:>12.2f} {x['client_cpu_us']:>18.0f} {x['client_cores']:>12.2f} "
                f"{1e6 / x['server_cpu_us']:>23.0f}"
            )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'R':>4} {'blocks/R':>8} {'ping p50/p99 us':>16} {'select p50/p99 us':>18} {'p50 ratio':>9} "
        f"{'ping rps':>9} {'select rps':>10} {'rps ratio':>9} {'core p50/p99 us':>16} {'+proto p50/p99':>15} "
        f"{'core cpu p50/p99':>16} {'in server p50/p99':>17} {'ingest ev/s inproc':>18} "
        f"{'wire':>9} {'rss MB':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['num_replicas']:>4} {r['blocks_per_replica']:>8} "
            f"{r['ping']['p50_us']:>7.0f}/{r['ping']['p99_us']:<8.0f} {r['select']['p50_us']:>8.0f}/{r['select']['p99_us']:<9.0f} "
            f"{r['select_over_ping_p50']:>9.2f} {r['throughput_ping_rps']:>9.0f} {r['throughput_select_rps']:>10.0f} "
            f"{r['throughput_ratio']:>9.2f} {r['compute_core']['p50_us']:>7.0f}/{r['compute_core']['p99_us']:<8.0f} "
            f"{r['compute_with_proto']['p50_us']:>6.0f}/{r['compute_with_proto']['p99_us']:<8.0f} "
            f"{r['compute_core_cpu']['p50_us']:>7.0f}/{r['compute_core_cpu']['p99_us']:<8.0f} "
            f"{r['core_in_server']['wall']['p50_us']:>8.0f}/{r['core_in_server']['wall']['p99_us']:<8.0f} "
            f"{r['ingest_inproc_events_per_s']:>18.0f} {r['ingest_wire_events_per_s']:>9.0f} {r['rss_mb']:>7.0f}"
        )
    return "\n".join(lines)
