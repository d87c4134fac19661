"""How much can R(c) buy on the fault scenarios? An oracle bound and where the TTFT tail comes from.

    python -m benchmarks.reward_bound --cells hetero:generated_shared_prefix \
        hetero:multi_turn_chat --replicas 32 --seed 0 --jobs 2 \
        --out benchmarks/results/reward_bound

For every cell (scenario x workload; scenario ``none`` = fault-free, for reference) it runs, on the same request list: the baselines
(``--baselines``, default the two that were best on these cells), TinyServe with R off
(``lambda_reward`` 0), with R on (defaults), and the ORACLE (``benchmarks/sim/oracle.py``: the
core is given the true speed, cache and load; R off). ``--reported`` adds TinyServe R off / R
on with the slowed replicas' meters seeing their real step times (``scenario_reported``).

Each run is traced lightly (nothing in the product changes): a request's admission time on its
replica (first successful allocation) splits TTFT into ``wait`` (arrival -> admission) and
``compute`` (admission -> first token); ``own`` is its own uncached prefill alone on an idle
replica at that replica's true speed at admission (``StepTimeModel.prefill_time``), so
``compute - own`` is what sharing steps with other requests added. ``on_fault`` is the share
of requests on a faulted replica (slowed at arrival or at first token; r000 for lossy_events).
Per run it reports these over all requests and over the tail (TTFT >= the run's p99).

The per-cell table adds the TTFT floor (``benchmarks/ttft_floor.py``: every request's own
cold prefill alone at full speed, of the blocks no earlier request computed): its p99 bounds
any policy's p99 from below, so where floor > 0.8 x best baseline, no policy reaches 0.8x.
Writes ``<out>.json`` (every run, cells, command) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import benchmarks.sim.policies  # noqa: F401  (registers load_only)
from benchmarks.sim.calibration import DEFAULT_CALIBRATION, load_calibration
from benchmarks.sim.cluster import SimConfig
from benchmarks.sim.oracle import ORACLE_PARTS
from benchmarks.sim.runner import DESIGN_REPLICAS, _workload, objective_config
from benchmarks.sim.scenarios import speed_at
from benchmarks.tail_breakdown import AdmissionSim
from benchmarks.ttft_floor import floors

R_OFF = {"lambda_reward": 0.0}


def variants(baselines: list[str], reported: bool, parts: list[str],
             extra: Sequence[tuple[str, dict[str, Any]]] = ()
             ) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(label, policy, objective overrides, sim overrides) of every run of a cell."""
    out = [(b, b, {}, {}) for b in baselines]
    out += [("r_off", "tinyserve", R_OFF, {}), ("r_on", "tinyserve", {}, {})]
    out += [(label, "tinyserve", obj, {}) for label, obj in extra]
    out += [("oracle", "tinyserve", R_OFF, {"oracle": "all"})]
    out += [(f"oracle_{p}", "tinyserve", R_OFF, {"oracle": p}) for p in parts]
    if reported:
        out += [("r_off_reported", "tinyserve", R_OFF, {"scenario_reported": True}),
                ("r_on_reported", "tinyserve", {}, {"scenario_reported": True})]
    return out


def run_traced(job: dict[str, Any]) -> dict[str, Any]:
    """One traced run (``job``: scenario, workload, label, policy, objective, sim, replicas,
    seed): its summary figures and the wait / own / shared decomposition."""
    n, seed = job["replicas"], job["seed"]
    wl = _workload(job["workload"], seed, n / DESIGN_REPLICAS, "{}")
    model = load_calibration(Path(DEFAULT_CALIBRATION))
    cfg = SimConfig(num_replicas=n, policy=job["policy"], model=model,
                    objective=objective_config(job["objective"]), seed=seed,
                    scenario="" if job["scenario"] == "none" else job["scenario"], **job["sim"])
    sim = AdmissionSim(cfg, wl)
    summary = sim.run()
    windows = {r.replica_id: r.speed_windows for r in sim.replicas}
    lossy = {r.replica_id for i, r in enumerate(sim.replicas)
             if sim.faults.drop_probability(i) > 0}
    rows = []
    for rec in sim.records:
        admit = sim.admitted.get(rec.request_id, rec.arrival_s)
        w = windows[rec.replica_id]
        speed = speed_at(w, admit) if w else 1.0
        own = model.prefill_time(rec.num_prompt_tokens - rec.num_cached_tokens,
                                 rec.num_cached_tokens) / speed
        slow = bool(w) and min(speed_at(w, rec.arrival_s), speed_at(w, rec.first_token_s)) < 1.0
        rows.append((rec.ttft_s, admit - rec.arrival_s, rec.first_token_s - admit, own,
                     float(slow or rec.replica_id in lossy),
                     rec.num_prompt_tokens - rec.num_cached_tokens))
    a = np.asarray(rows)
    p99 = float(np.percentile(a[:, 0], 99))
    out: dict[str, Any] = {k: job[k] for k in ("scenario", "workload", "label", "policy",
                                               "objective", "sim", "replicas", "seed")}
    out.update(ttft_p99_s=summary.ttft_p99_s, ttft_p50_s=summary.ttft_p50_s,
               hit_ratio=summary.hit_ratio, imbalance=summary.imbalance,
               cluster_utilization=summary.cluster_utilization, num_requests=len(rows),
               sim_wall_s=summary.sim_wall_s)
    for group, sel in (("all", a), ("tail", a[a[:, 0] >= p99])):
        out[f"{group}_n"] = len(sel)
        for j, key in enumerate(("ttft", "wait", "compute", "own", "on_fault", "miss_tokens")):
            out[f"{group}_{key}"] = float(sel[:, j].mean())
        out[f"{group}_shared"] = out[f"{group}_compute"] - out[f"{group}_own"]
    return out


def cells_table(runs: list[dict[str, Any]], floor_p99: dict[str, float],
                baselines: list[str]) -> tuple[list[dict[str, Any]], str]:
    """One row per cell: best baseline, TinyServe variants as ratios, floor; and markdown."""
    by_cell: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_cell.setdefault((r["scenario"], r["workload"]), {})[r["label"]] = r
    present = list(dict.fromkeys(r["label"] for r in runs if r["label"] not in baselines))
    cells, lines = [], []
    head = ["scenario", "workload", "best baseline (p99 s)", *[f"{lb} p99 s (ratio)" for lb in present],
            "floor p99 s (/best)", "0.8x: oracle / any policy"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (scen, wl), c in sorted(by_cell.items()):
        base = [c[b] for b in baselines if b in c]
        if not base:
            continue
        best = min(base, key=lambda r: r["ttft_p99_s"])
        bp = best["ttft_p99_s"]
        row: dict[str, Any] = {"scenario": scen, "workload": wl, "best_baseline": best["label"],
                               "best_baseline_p99_s": bp, "floor_p99_s": floor_p99.get(wl)}
        cols = [scen, wl, f"{best['label']} ({bp:.3f})"]
        for lb in present:
            if lb in c:
                row[f"{lb}_p99_s"] = c[lb]["ttft_p99_s"]
                row[f"{lb}_ratio"] = c[lb]["ttft_p99_s"] / bp
                cols.append(f"{c[lb]['ttft_p99_s']:.3f} ({row[f'{lb}_ratio']:.2f})")
            else:
                cols.append("-")
        fl = floor_p99.get(wl)
        row["floor_over_best"] = fl / bp if fl else None
        cols.append(f"{fl:.3f} ({fl / bp:.2f})" if fl else "-")
        oracle_ok = "oracle" in c and c["oracle"]["ttft_p99_s"] <= 0.8 * bp
        any_ok = fl is None or fl <= 0.8 * bp
        row.update(oracle_meets_0p8=oracle_ok, floor_allows_0p8=any_ok)
        cols.append(f"{'yes' if oracle_ok else 'NO'} / {'possible' if any_ok else 'NO (floor)'}")
        cells.append(row)
        lines.append("| " + " | ".join(cols) + " |")
    return cells, "\n".join(lines) + "\n"


def tail_table(runs: list[dict[str, Any]]) -> str:
    """Per run: p99 and the tail's (TTFT >= p99) mean split, next to all requests'."""
    head = ("| scenario | workload | run | p99 s | hit | tail n | tail ttft s | wait s | own s | "
            "shared s | on faulted replica | all: wait s | own s | on faulted |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(runs, key=lambda r: (r["scenario"], r["workload"], r["label"])):
        lines.append(
            f"| {r['scenario']} | {r['workload']} | {r['label']} | {r['ttft_p99_s']:.3f} | "
            f"{r['hit_ratio']:.3f} | {r['tail_n']} | {r['tail_ttft']:.3f} | {r['tail_wait']:.3f} | "
            f"{r['tail_own']:.3f} | {r['tail_shared']:.3f} | {r['tail_on_fault']:.2f} | "
            f"{r['all_wait']:.3f} | {r['all_own']:.3f} | {r['all_on_fault']:.3f} |")
    return "\n".join(lines) + "\n"


def matrix_table(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """TinyServe rows of routing_bench outputs (fault-free matrix): each objective variant's
    p99 over R off's (``lambda_reward`` 0) per (workload, replicas, seed); and markdown."""
    cells: dict[tuple[str, int, int], dict[str, float]] = {}
    for r in rows:
        if r["policy"] == "tinyserve" and not r.get("sim_overrides", {}).get("scenario"):
            obj = r["objective_overrides"]
            label = ("R off" if obj == R_OFF else "R on (defaults)" if not obj
                     else json.dumps(obj, sort_keys=True))
            cells.setdefault((r["workload"], r["num_replicas"], r["seed"]), {})[label] = r["ttft_p99_s"]
    labels = sorted({lb for c in cells.values() for lb in c if lb != "R off"})
    out, ratios = [], {lb: [] for lb in labels}
    lines = ["| workload | replicas | seed | R off p99 s | " + " | ".join(f"{lb} / off" for lb in labels)
             + " |", "|---|---:|---:|---:|" + "---:|" * len(labels)]
    for (wl, n, seed), c in sorted(cells.items()):
        off = c.get("R off")
        if not off:
            continue
        row = {"workload": wl, "num_replicas": n, "seed": seed, "r_off_p99_s": off,
               "ratios": {lb: c[lb] / off for lb in labels if lb in c}}
        out.append(row)
        for lb, v in row["ratios"].items():
            ratios[lb].append(v)
        lines.append(f"| {wl} | {n} | {seed} | {off:.4f} | "
                     + " | ".join(f"{row['ratios'][lb]:.3f}" if lb in row["ratios"] else "-"
                                  for lb in labels) + " |")
    for lb, v in ratios.items():
        if v:
            lines.append(f"\n{lb}: geometric mean over R off {float(np.exp(np.mean(np.log(v)))):.3f}, "
                         f"worst {max(v):.3f}, best {min(v):.3f} ({len(v)} cells)")
    return out, "\n".join(lines) + "\n"


def _job_key(j: dict[str, Any]) -> str:
    return json.dumps([j["scenario"], j["workload"], j["label"], j["replicas"], j["seed"],
                       j["objective"], j["sim"]], sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", required=True, help="scenario:workload ...")
    ap.add_argument("--baselines", nargs="+", default=["preble", "llmd_weighted"])
    ap.add_argument("--replicas", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reported", nargs="*", default=[],
                    help="scenarios that also get the scenario_reported runs (R off / R on)")
    ap.add_argument("--oracle-parts", nargs="*", default=[], choices=ORACLE_PARTS,
                    help="also one oracle run per part alone (what each piece of truth buys)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=JSON",
                    help="an extra TinyServe run per cell with these objective overrides")
    ap.add_argument("--matrix", nargs="*", default=[], metavar="JSON",
                    help="routing_bench outputs of the fault-free matrix (TinyServe R off and "
                    "variants): tabled as variant / R off into <out>_matrix.md")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--reuse", nargs="*", default=[], help="earlier .json / .partial.jsonl")
    ap.add_argument("--out", default="benchmarks/results/reward_bound")
    args = ap.parse_args(argv)
    extra = [(v.partition("=")[0], json.loads(v.partition("=")[2])) for v in args.variant]
    jobs = []
    for cell in args.cells:
        scen, _, wl = cell.partition(":")
        for label, policy, obj, sim in variants(args.baselines, scen in args.reported,
                                                    args.oracle_parts, extra):
            jobs.append({"scenario": scen, "workload": wl, "label": label, "policy": policy,
                         "objective": obj, "sim": sim, "replicas": args.replicas,
                         "seed": args.seed})
    done: dict[str, dict[str, Any]] = {}
    for path in args.reuse:
        text = Path(path).read_text()
        rows = ([json.loads(x) for x in text.splitlines() if x.strip()] if path.endswith(".jsonl")
                else json.loads(text)["runs"])
        done.update({_job_key(r): r for r in rows})
    todo = [j for j in jobs if _job_key(j) not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} reused", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".partial.jsonl"), "a") as sink, \
            ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for row in pool.map(run_traced, todo):
            done[_job_key(row)] = row
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"{row['scenario']} {row['workload']} {row['label']}: p99 "
                  f"{row['ttft_p99_s']:.4f} s ({row['sim_wall_s']:.0f} s)", flush=True)
    runs = [done[_job_key(j)] for j in jobs]
    model = load_calibration(Path(DEFAULT_CALIBRATION))
    floor_p99 = {}
    for wl in sorted({j["workload"] for j in jobs}):
        f = floors(_workload(wl, args.seed, args.replicas / DESIGN_REPLICAS, "{}"), model)
        floor_p99[wl] = float(np.percentile(list(f.values()), 99))
    cells, cell_md = cells_table(runs, floor_p99, args.baselines)
    tails = tail_table(runs)
    command = "python -m benchmarks.reward_bound " + " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "runs": runs, "cells": cells, "floor_p99_s": floor_p99}, indent=1))
    out.with_suffix(".md").write_text(f"Command: `{command}`\n\n{cell_md}\n{tails}")
    print(cell_md)
    print(tails)
    if args.matrix:
        rows = [r for f in args.matrix for r in json.loads(Path(f).read_text())["runs"]]
        mcells, mmd = matrix_table(rows)
        Path(f"{out}_matrix.json").write_text(json.dumps(
            {"command": command, "sources": args.matrix, "runs": rows, "cells": mcells}, indent=1))
        Path(f"{out}_matrix.md").write_text(f"Command: `{command}` (matrix: {' '.join(args.matrix)})\n\n{mmd}")
        print(mmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
