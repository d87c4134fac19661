"""gpu_ab's report: the markdown tables (every replay; the mean over seeds) and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MEAN_COLS = ["ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "throughput_tok_s",
             "hit_ratio", "imbalance", "kv_usage_mean"]


def _markdown(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else
                                     str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def table(rows: list[dict[str, Any]]) -> str:
    """Every replay, a row."""
    return _markdown(rows, ["workload", "policy", "seed", "num_requests", "num_errors", *MEAN_COLS])


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, policy): the mean of each figure over the seeds that ran it."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["policy"]), []).append(r)
    out = []
    for (w, p), rs in groups.items():
        row: dict[str, Any] = {"workload": w, "policy": p, "seeds": len(rs),
                               "num_requests": sum(r.get("num_requests", 0) for r in rs),
                               "num_errors": sum(r.get("num_errors", 0) or 0 for r in rs)}
        for c in MEAN_COLS:
            vals = [r[c] for r in rs if isinstance(r.get(c), (int, float))]
            if vals:
                row[c] = float(np.mean(vals))
        out.append(row)
    return out


def mean_table(rows: list[dict[str, Any]]) -> str:
    """A row per (workload, policy): the mean over its seeds."""
    return _markdown(mean_rows(rows),
                     ["workload", "policy", "seeds", "num_requests", "num_errors", *MEAN_COLS])


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = mean_rows(rows)
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        rs = [r for r in rows if r["workload"] == w]
        x = np.arange(len(rs))
        ax.bar(x - 0.2, [r.get("ttft_p50_s", 0) for r in rs], 0.4, label="TTFT p50")
        ax.bar(x + 0.2, [r.get("ttft_p99_s", 0) for r in rs], 0.4, label="TTFT p99")
        ax.set_xticks(x, [r["policy"] for r in rs], rotation=40, ha="right", fontsize=8)
        ax.set_title(w, fontsize=9)
        ax.set_ylabel("s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
