"""Aggregation, target checks, markdown tables and PNG plots for routing-benchmark rows.

Rows are ``RunSummary`` dicts (one per workload x policy x size x seed). ``aggregate`` takes
the median over seeds; ``targets`` evaluates the issue's headline targets against the best
baseline *of the same run matrix* (never against numbers from another run).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sim.policies import LOAD_ONLY, TINYSERVE

METRICS = (
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "throughput_tok_s", "hit_ratio", "imbalance",
    "usage", "utilization", "f_total", "num_preemptions", "sim_wall_s",
    "offered_load_req_s", "cluster_utilization",
)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over seeds per (workload, policy, num_replicas); keeps ``seeds`` and, for staged
    workloads, the median per-stage throughput."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["workload"], r["policy"], r["num_replicas"])].append(r)
    out = []
    for (w, p, n), rs in sorted(groups.items()):
        agg: dict[str, Any] = {"workload": w, "policy": p, "num_replicas": n,
                               "seeds": sorted(r["seed"] for r in rs)}
        for m in METRICS:
            # NOTE: rows from before a metric existed (--reuse of older outputs) give NaN.
            agg[m] = float(np.median([r.get(m, np.nan) for r in rs]))
        stages = [r["stage_throughput_tok_s"] for r in rs if r.get("stage_throughput_tok_s")]
        agg["stage_throughput_tok_s"] = np.median(np.asarray(stages), axis=0).tolist() if stages else []
        out.append(agg)
    return out


def _by_cell(agg: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    cells: dict[tuple[str, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for a in agg:
        cells[(a["workload"], a["num_replicas"])][a["policy"]] = a
    return cells


def targets(agg: Sequence[dict[str, Any]], ours: str = TINYSERVE) -> dict[str, Any]:
    """Per (workload, size): TinyServe's TTFT p99 / best baseline's, hit-ratio gap to the best
    baseline hit ratio, and whether each target holds; plus the B2B throughput ratios."""
    cells = []
    for (w, n), pols in sorted(_by_cell(agg).items()):
        if ours not in pols or len(pols) < 2:
            continue
        base = {p: a for p, a in pols.items() if p != ours and p != LOAD_ONLY}
        if not base:
            continue
        best_p = min(base, key=lambda p: base[p]["ttft_p99_s"])
        best_hit_p = max(base, key=lambda p: base[p]["hit_ratio"])
        t = pols[ours]
        ratio = t["ttft_p99_s"] / base[best_p]["ttft_p99_s"] if base[best_p]["ttft_p99_s"] > 0 else 1.0
        gap = t["hit_ratio"] - base[best_hit_p]["hit_ratio"]
        cells.append({
            "workload": w, "num_replicas": n, "best_baseline": best_p,
            "best_baseline_ttft_p99_s": base[best_p]["ttft_p99_s"], "ttft_p99_s": t["ttft_p99_s"],
            "ttft_p99_ratio": ratio, "best_hit_baseline": best_hit_p,
            "hit_ratio": t["hit_ratio"], "best_baseline_hit_ratio": base[best_hit_p]["hit_ratio"],
            "hit_gap_points": 100 * gap, "ttft_ok": ratio <= 1.0, "ttft_0p8": ratio <= 0.8,
            "hit_ok": gap >= -0.02,
        })
    sizes = sorted({c["num_replicas"] for c in cells})
    per_size = {
        n: {"all_ttft_ok": all(c["ttft_ok"] for c in cells if c["num_replicas"] == n),
            "num_0p8": sum(c["ttft_0p8"] for c in cells if c["num_replicas"] == n),
            "all_hit_ok": all(c["hit_ok"] for c in cells if c["num_replicas"] == n)}
        for n in sizes
    }
    b2b = []
    for (w, n), pols in sorted(_by_cell(agg).items()):
        if w != "b2b_saas" or ours not in pols:
            continue
        row: dict[str, Any] = {"num_replicas": n}
        for ref in (LOAD_ONLY, "power_of_two", "round_robin"):
            if ref in pols:
                row[f"top_stage_ratio_vs_{ref}"] = _top_stage_ratio(pols[ours], pols[ref])
                row[f"overall_ratio_vs_{ref}"] = (
                    pols[ours]["throughput_tok_s"] / pols[ref]["throughput_tok_s"])
        b2b.append(row)
    return {"cells": cells, "per_size": per_size, "b2b_throughput": b2b}


def _top_stage_ratio(ours: dict[str, Any], ref: dict[str, Any]) -> float:
    a, b = ours["stage_throughput_tok_s"], ref["stage_throughput_tok_s"]
    if not a or not b or b[-1] <= 0:
        return float("nan")
    return float(a[-1] / b[-1])


def markdown(agg: Sequence[dict[str, Any]], tg: dict[str, Any]) -> str:
    """The results table (one row per workload x size x policy) plus target summaries."""
    lines = ["| workload | replicas | policy | TTFT p50 s | TTFT p90 s | TTFT p99 s | "
             "throughput tok/s | hit ratio | imbalance | usage | F_total | preempt | "
             "offered req/s | busy |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a in sorted(agg, key=lambda a: (a["workload"], a["num_replicas"], a["ttft_p99_s"])):
        lines.append(
            f"| {a['workload']} | {a['num_replicas']} | {a['policy']} | {a['ttft_p50_s']:.3f} | "
            f"{a['ttft_p90_s']:.3f} | {a['ttft_p99_s']:.3f} | {a['throughput_tok_s']:.0f} | "
            f"{a['hit_ratio']:.3f} | {a['imbalance']:.2f} | {a['usage']:.2f} | "
            f"{a['f_total']:.3f} | {a['num_preemptions']:.0f} | "
            f"{a['offered_load_req_s']:.0f} | {a['cluster_utilization']:.2f} |")
    lines += ["", "| workload | replicas | best baseline (p99) | its TTFT p99 s | TinyServe p99 s | "
              "ratio | hit gap (pts, vs best-hit baseline) | p99 ok | <=0.8x | hit ok |",
              "|---|---:|---|---:|---:|---:|---:|---|---|---|"]
    for c in tg["cells"]:
        lines.append(
            f"| {c['workload']} | {c['num_replicas']} | {c['best_baseline']} | "
            f"{c['best_baseline_ttft_p99_s']:.3f} | {c['ttft_p99_s']:.3f} | "
            f"{c['ttft_p99_ratio']:.2f} | {c['hit_gap_points']:+.1f} ({c['best_hit_baseline']}) | "
            f"{'yes' if c['ttft_ok'] else 'NO'} | {'yes' if c['ttft_0p8'] else 'no'} | "
            f"{'yes' if c['hit_ok'] else 'NO'} |")
    for row in tg["b2b_throughput"]:
        parts = ", ".join(f"{k} = {v:.2f}" for k, v in row.items() if k != "num_replicas")
        lines.append(f"\nB2B SaaS throughput @ {row['num_replicas']} replicas: {parts}")
    return "\n".join(lines) + "\n"


def plots(agg: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Grouped bars of TTFT p99 and hit ratio per workload and policy (one PNG per size), and
    the B2B per-stage throughput curve. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for n in sorted({a["num_replicas"] for a in agg}):
        rows = [a for a in agg if a["num_replicas"] == n]
        wls = sorted({a["workload"] for a in rows})
        pols = sorted({a["policy"] for a in rows}, key=lambda p: (p != TINYSERVE, p))
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(wls)), 8))
        width = 0.8 / max(len(pols), 1)
        for metric, ax, label in ((("ttft_p99_s"), axes[0], "TTFT p99 (s, log)"),
                                  (("hit_ratio"), axes[1], "prefix-hit token ratio")):
            for j, p in enumerate(pols):
                vals = [next((a[metric] for a in rows if a["workload"] == w and a["policy"] == p),
                             np.nan) for w in wls]
                ax.bar(np.arange(len(wls)) + j * width, vals, width, label=p)
            ax.set_xticks(np.arange(len(wls)) + 0.4 - width / 2, wls, rotation=20, fontsize=8)
            ax.set_ylabel(label)
            if metric == "ttft_p99_s":
                ax.set_yscale("log")
        axes[0].legend(fontsize=7, ncol=3)
        axes[0].set_title(f"{n} replicas (median over seeds)")
        fig.tight_layout()
        path = out_dir / f"routing_{n}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    b2b = [a for a in agg if a["workload"] == "b2b_saas" and a["stage_throughput_tok_s"]]
    if b2b:
        fig, ax = plt.subplots(figsize=(7, 4))
        for a in sorted(b2b, key=lambda a: (a["num_replicas"], a["policy"])):
            ax.plot(a["stage_throughput_tok_s"], marker="o",
                    label=f"{a['policy']} @{a['num_replicas']}")
        ax.set_xlabel("QPS stage (3 -> 60 x replicas/8)")
        ax.set_ylabel("output tokens/s completed in stage")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / "b2b_stage_throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
