"""Compute per Select, this tree against a baseline commit, interleaved in one run.

Two worker processes (``selector_p99_worker.py``), one per tree, each hold the selector_bench
fleet (R replicas x blocks, 128-block prompts sharing a random prefix with one chain); the
driver alternates short chunks of Selects between them so the drift of a shared machine's
load hits both alike. Two phases:

- ``fresh``: back to back on a just-populated core, the issue's "compute per Select"
  (selector_bench's ``compute_core``): few pending marks, none expired yet.
- ``noise``: one prompt again and again without speculative inserts (a fixed, cache-warm
  workload): its p99/p50 is what this machine's noise alone does to a tail.
- ``steady``: paced at ``--rate`` Selects/s for ``--steady-s`` seconds per side after a
  warm-up longer than the pending TTL, so every Select also expires the marks of the one
  ``TTL`` earlier and the pending tables hold ~TTL x rate marks (the service's steady state).

Reports p50/p90/p99 of wall time and of thread CPU time per Select (CPU time leaves out the
time the process sat descheduled on a busy machine), with the load average before and after.

    python benchmarks/selector_p99.py --base deb02f5 --json benchmarks/results/selector_p99.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("selector_p99_worker.py")


def export_tree(commit: str, into: Path) -> Path:
    """``git archive`` of ``commit`` under ``into`` (reused when already there)."""
    out = into / commit
    if not (out / "cluster").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit],
                                 check=True, capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


class Worker:
    """A worker process over one tree."""

    def __init__(self, name: str, tree: Path, ns: argparse.Namespace) -> None:
        self.name = name
        args = [str(tree), str(ns.replicas), str(ns.blocks_per_replica), str(ns.copies),
                str(ns.seed)]  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, str(WORKER), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=str(tree))  # fmt: skip

    def ready(self) -> dict[str, Any]:
        return self._read()

    def run(self, start: int, n: int, rate: float, op: str = "run") -> dict[str, list[float]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "start": start, "n": n, "rate": rate}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited ({self.proc.wait()})")
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
        self.proc.wait(60)


def _pcts(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e6
    return {f"p{q}_us": float(np.percentile(a, q)) for q in (50, 90, 99)} | {
        "mean_us": float(a.mean()), "max_us": float(a.max()), "n": len(a)}  # fmt: skip


def _phase(workers: list[Worker], ns: argparse.Namespace, phase: str) -> dict[str, Any]:
    """Alternating chunks; returns per worker the pooled wall/cpu percentiles."""
    op = "replay" if phase == "noise" else "run"
    if phase in ("fresh", "noise"):
        chunk, rounds, rate = ns.fresh_chunk, ns.fresh_n // ns.fresh_chunk, 0.0
        first = 0 if phase == "fresh" else 500_000
    else:
        chunk = max(int(ns.rate * ns.chunk_s), 1)
        rounds, rate, first = max(int(ns.steady_s / ns.chunk_s), 1), ns.rate, 1_000_000
        # NOTE: warm-up: each side runs past one TTL (2 s) of marks before anything counts
        warm = int(ns.rate * 2.5)
        for w in workers:
            w.run(first, warm, rate)
        first += warm
    got: dict[str, dict[str, list[float]]] = {w.name: {"wall": [], "cpu": []} for w in workers}
    for r in range(rounds):
        order = workers if r % 2 == 0 else workers[::-1]
        for w in order:
            res = w.run(first + (0 if op == "replay" else r * chunk), chunk, rate, op)
            got[w.name]["wall"] += res["wall"]
            got[w.name]["cpu"] += res["cpu"]
    return {name: {"wall": _pcts(v["wall"]), "cpu": _pcts(v["cpu"])} for name, v in got.items()}


def _table(results: dict[str, Any]) -> str:
    head = (f"{'phase':<7} {'tree':<10} {'wall p50':>8} {'p90':>6} {'p99':>6} "
            f"{'cpu p50':>8} {'p90':>6} {'p99':>6} {'p99/p50':>7}   (us per Select)")  # fmt: skip
    lines = [head, "-" * len(head)]
    for phase, per in results.items():
        for name, r in per.items():
            w, c = r["wall"], r["cpu"]
            lines.append(f"{phase:<7} {name:<10} {w['p50_us']:>8.1f} {w['p90_us']:>6.1f} "
                         f"{w['p99_us']:>6.1f} {c['p50_us']:>8.1f} {c['p90_us']:>6.1f} "
                         f"{c['p99_us']:>6.1f} {c['p99_us'] / c['p50_us']:>7.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--base", default="", help="baseline commit (empty: this tree alone)")
    p.add_argument("--replicas", type=int, default=256)
    p.add_argument("--blocks-per-replica", type=int, default=100_000)
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fresh-n", type=int, default=2000, help="fresh phase: Selects per side")
    p.add_argument("--fresh-chunk", type=int, default=250)
    p.add_argument("--rate", type=float, default=5000.0, help="steady phase: Selects/s")
    p.add_argument("--steady-s", type=float, default=4.0, help="steady phase: seconds per side")
    p.add_argument("--chunk-s", type=float, default=0.5)
    p.add_argument("--phases", nargs="+", default=["fresh", "noise", "steady"],
                   choices=["fresh", "noise", "steady"])
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args(argv)
    trees = [("this", ROOT)]
    if ns.base:
        trees.append(("base", export_tree(ns.base, Path(tempfile.gettempdir()) / "tinyserve-base")))
    load0 = os.getloadavg()
    workers = [Worker(name, tree, ns) for name, tree in trees]
    try:
        info = {w.name: w.ready() for w in workers}
        t0 = time.time()
        results = {phase: _phase(workers, ns, phase) for phase in ns.phases}
    finally:
        for w in workers:
            w.close()
    load1 = os.getloadavg()
    print(_table(results))
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f}, after {load1[0]:.2f} {load1[1]:.2f}"
          f" ({os.cpu_count()} CPUs, {time.time() - t0:.0f} s measured)")  # fmt: skip
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"argv": sys.argv[1:], "base": ns.base, "load_before": load0, "load_after": load1,
                "cpu_count": os.cpu_count(), "workers": info}  # fmt: skip
        ns.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
