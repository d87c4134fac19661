"""Tables of ``benchmarks/README.md`` generated from committed JSON (never hand-copied).

    python -m benchmarks.readme_tables \
        --routing benchmarks/results/routing.json \
        --reward benchmarks/results/reward_scenarios.json \
        --reward-matrix benchmarks/results/reward_matrix.json

Each table lives between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers in the README
and is replaced in place (``--check``: exit 1 when the README differs, write nothing):

- ``routing-headline``: TinyServe TTFT p99 / best baseline's per workload and cluster size,
  medians over the seeds, from a routing_bench JSON's ``targets`` (hit gap in brackets).
- ``reward-scenarios``: the fault scenarios (``benchmarks/sim/scenarios.py``): best baseline,
  TinyServe with R off (``lambda_reward`` 0) and on (the defaults), each p99 and its ratio.
- ``reward-matrix``: TinyServe with R on over R off on the fault-free matrix (p99 and hits).
- ``reward-levers``: the fault scenarios under each objective override measured.
- ``rates-fit``: TinyServe with the configured prefill rate against the replicas' measured
  rates (``--rates CONFIGURED MEASURED [BEFORE]``, routing_bench outputs).

``--collect OUT FILES...`` assembles routing_bench outputs into one JSON (every row, and the
scenario cells) plus ``OUT.md`` with the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sim.policies import LOAD_ONLY, TINYSERVE
from benchmarks.sim.runner import load_rows

README = Path(__file__).parent / "README.md"
R_OFF = {"lambda_reward": 0.0}


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the lines between NAME's markers replaced by ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"README lacks the markers {begin} / {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body.rstrip()}\n{end}{tail}"


def write_or_check(path: Path, text: str, new: str, check: bool) -> int:
    """``--check``: 0 when ``new`` equals the README's ``text``, else 1 (nothing written);
    otherwise write ``new`` and say whether it changed. The exit status of the CLIs."""
    if check:
        return 0 if new == text else 1
    path.write_text(new)
    print(f"updated {path}" if new != text else f"{path} unchanged")
    return 0


def routing_headline(doc: dict[str, Any]) -> str:
    cells = doc["targets"]["cells"]
    sizes = sorted({c["num_replicas"] for c in cells})
    by = {(c["workload"], c["num_replicas"]): c for c in cells}
    lines = ["| workload | " + " | ".join(f"{n} replicas" for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]  # fmt: skip
    for wl in sorted({c["workload"] for c in cells}):
        row = []
        for n in sizes:
            c = by.get((wl, n))
            if c is None:
                row.append("-")
                continue
            ratio = f"{c['ttft_p99_ratio']:.2f}"
            ratio = f"**{ratio}**" if c["ttft_p99_ratio"] <= 1.0 else ratio
            row.append(f"{ratio} ({c['hit_gap_points']:+.1f}; {c['best_baseline']})")
        lines.append(f"| {wl} | " + " | ".join(row) + " |")
    seeds = sorted({r["seed"] for r in doc["runs"]})
    lines.append("")
    lines.append(f"TinyServe TTFT p99 / best baseline's (bold: <= 1), medians over seeds "
                 f"{', '.join(map(str, seeds))}; in brackets the hit-ratio gap to the best-hit "
                 f"baseline (points) and the best baseline. From `{doc['command']}`.")  # fmt: skip
    return "\n".join(lines)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def _variant(row: dict[str, Any]) -> str:
    if row["policy"] != TINYSERVE:
        return row["policy"]
    return "R off" if row["objective_overrides"] == R_OFF else (
        "R on" if not row["objective_overrides"] else "")  # fmt: skip


def scenario_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (scenario, workload, replicas): best baseline p99 and TinyServe R off / on."""
    groups: dict[tuple[str, str, int], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))  # fmt: skip
    for r in rows:
        sc = r.get("sim_overrides", {}).get("scenario", "")
        v = _variant(r)
        if v and r["policy"] != LOAD_ONLY:
            groups[(sc, r["workload"], r["num_replicas"])][v].append(r)
    out = []
    for (sc, wl, n), pols in sorted(groups.items()):
        base = {p: v for p, v in pols.items() if p not in ("R on", "R off")}
        if not base or "R on" not in pols:
            continue
        best = min(base, key=lambda p: _median(base[p], "ttft_p99_s"))
        b99 = _median(base[best], "ttft_p99_s")
        cell: dict[str, Any] = {"scenario": sc, "workload": wl, "num_replicas": n,
                                "best_baseline": best, "best_baseline_ttft_p99_s": b99,
                                "num_baselines": len(base),
                                "seeds": sorted({r["seed"] for r in pols["R on"]}),
                                "best_hit_ratio": max(_median(v, "hit_ratio") for v in base.values())}  # fmt: skip
        for v in ("R off", "R on"):
            if v in pols:
                p99 = _median(pols[v], "ttft_p99_s")
                cell[v] = {"ttft_p99_s": p99, "ratio": p99 / b99,
                           "hit_ratio": _median(pols[v], "hit_ratio"),
                           "cluster_utilization": _median(pols[v], "cluster_utilization")}  # fmt: skip
        out.append(cell)
    return out


def reward_scenarios(doc: dict[str, Any]) -> str:
    lines = ["| scenario | workload | replicas | best baseline (p99 s) | TinyServe R off: p99 s (ratio) "
             "| R on: p99 s (ratio) | <= 0.8x | hit ratio R on (best baseline) |",
             "|---|---|---:|---|---:|---:|---|---:|"]  # fmt: skip
    for c in doc["cells"]:
        off, on = c.get("R off"), c["R on"]
        off_s = f"{off['ttft_p99_s']:.3f} ({off['ratio']:.2f})" if off else "-"
        lines.append(
            f"| {c['scenario']} | {c['workload']} | {c['num_replicas']} | {c['best_baseline']} "
            f"({c['best_baseline_ttft_p99_s']:.3f}) | {off_s} | {on['ttft_p99_s']:.3f} "
            f"({on['ratio']:.2f}) | {'yes' if on['ratio'] <= 0.8 else 'NO'} | "
            f"{on['hit_ratio']:.3f} ({c['best_hit_ratio']:.3f}) |")
    return "\n".join(lines)


def reward_matrix(doc: dict[str, Any]) -> str:
    """R on over R off per workload and size, medians over seeds."""
    groups: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))  # fmt: skip
    for r in doc["runs"]:
        v = _variant(r)
        if v in ("R on", "R off") and not r.get("sim_overrides", {}).get("scenario"):
            groups[(r["workload"], r["num_replicas"])][v].append(r)
    lines = ["| workload | replicas | seeds | p99 R off s | p99 R on s | on / off | hit off | hit on |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    ratios = []
    for (wl, n), v in sorted(groups.items()):
        if "R on" not in v or "R off" not in v:
            continue
        a, b = _median(v["R off"], "ttft_p99_s"), _median(v["R on"], "ttft_p99_s")
        ratios.append(b / a)
        seeds = ",".join(str(s) for s in sorted({r["seed"] for r in v["R on"]}))
        lines.append(f"| {wl} | {n} | {seeds} | {a:.3f} | {b:.3f} | {b / a:.3f} | "
                     f"{_median(v['R off'], 'hit_ratio'):.3f} | {_median(v['R on'], 'hit_ratio'):.3f} |")  # fmt: skip
    if ratios:
        geo = float(np.exp(np.mean(np.log(ratios))))
        lines += ["", f"Geometric mean of on / off over the {len(ratios)} cells: {geo:.3f}; "
                  f"worst {max(ratios):.3f}, best {min(ratios):.3f}."]  # fmt: skip
    return "\n".join(lines)


def _tinyserve_cells(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """TinyServe rows with the default objective and no fault scenario, by (workload, size)."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if _variant(r) == "R on" and not r.get("sim_overrides", {}).get("scenario"):
            out[(r["workload"], r["num_replicas"])].append(r)
    return out


def rates_fit(configured: list[dict[str, Any]], measured: list[dict[str, Any]],
              before: list[dict[str, Any]] | None = None) -> str:
    """TinyServe with the configured rate against the replicas' measured rates (the step-time
    fit; ``before``: the meter before it), medians over seeds, per workload and size."""
    conf, fit = _tinyserve_cells(configured), _tinyserve_cells(measured)
    old = _tinyserve_cells(before or [])
    head = "| workload | replicas | seeds | p99 configured s | p99 measured s | measured / configured "
    sub = "|---|---:|---|---:|---:|---:|"
    if old:
        head += "| p99 meter before s | before / configured "
        sub += "---:|---:|"
    lines = [head + "| hit configured | hit measured |" + (" hit before |" if old else ""),
             sub + "---:|---:|" + ("---:|" if old else "")]  # fmt: skip
    ratios, before_ratios = [], []
    for key in sorted(set(conf) & set(fit)):
        seeds = sorted({r["seed"] for r in conf[key]} & {r["seed"] for r in fit[key]})
        c = [r for r in conf[key] if r["seed"] in seeds]
        f = [r for r in fit[key] if r["seed"] in seeds]
        a, b = _median(c, "ttft_p99_s"), _median(f, "ttft_p99_s")
        ratios.append(b / a)
        line = f"| {key[0]} | {key[1]} | {','.join(map(str, seeds))} | {a:.4f} | {b:.4f} | {b / a:.3f} "
        o = [r for r in old.get(key, []) if r["seed"] in seeds]
        if old:
            if o:
                before_ratios.append(_median(o, "ttft_p99_s") / a)
                line += f"| {_median(o, 'ttft_p99_s'):.4f} | {before_ratios[-1]:.3f} "
            else:
                line += "| - | - "
        line += f"| {_median(c, 'hit_ratio'):.3f} | {_median(f, 'hit_ratio'):.3f} |"
        if old:
            line += f" {_median(o, 'hit_ratio'):.3f} |" if o else " - |"
        lines.append(line)
    for name, rs in (("measured / configured", ratios), ("before / configured", before_ratios)):
        if rs:
            geo = float(np.exp(np.mean(np.log(rs))))
            lines.append(f"{'' if name.startswith('before') else chr(10)}Geometric mean of "
                         f"{name} over {len(rs)} cells: {geo:.3f}; worst {max(rs):.3f}, "
                         f"best {min(rs):.3f}.")  # fmt: skip
    return "\n".join(lines)


def _lever(row: dict[str, Any]) -> str:
    obj = row["objective_overrides"]
    if not obj:
        return "defaults"
    if obj == R_OFF:
        return "R off"
    rep = " (reported)" if row.get("sim_overrides", {}).get("scenario_reported") else ""
    return ", ".join(f"{k} {v:g}" for k, v in sorted(obj.items())) + rep


def reward_levers(rows: list[dict[str, Any]]) -> str:
    """Per fault scenario cell: TinyServe's p99 / the best baseline's under each objective
    override measured (the reward's levers), medians over the seeds present."""
    cells: dict[tuple[str, str, int], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))  # fmt: skip
    for r in rows:
        sc = r.get("sim_overrides", {}).get("scenario", "")
        if not sc or r["policy"] == LOAD_ONLY:
            continue
        name = _lever(r) if r["policy"] == TINYSERVE else r["policy"]
        if r["policy"] == TINYSERVE and r.get("sim_overrides", {}).get("scenario_reported"):
            name = "defaults, rates reported" if not r["objective_overrides"] else name
        cells[(sc, r["workload"], r["num_replicas"])][name].append(r)
    levers = sorted({v for c in cells.values() for v in c if v not in _BASELINE_NAMES},
                    key=lambda v: (not v.startswith(("R off", "defaults")), v))  # fmt: skip
    lines = ["| scenario | workload | replicas | best baseline p99 s | "
             + " | ".join(levers) + " |", "|---|---|---:|---:|" + "---:|" * len(levers)]  # fmt: skip
    for (sc, wl, n), pols in sorted(cells.items()):
        base = {p: v for p, v in pols.items() if p in _BASELINE_NAMES}
        if not base:
            continue
        b99 = min(_median(v, "ttft_p99_s") for v in base.values())
        vals = [f"{_median(pols[lv], 'ttft_p99_s') / b99:.2f}" if lv in pols else "-"
                for lv in levers]  # fmt: skip
        lines.append(f"| {sc} | {wl} | {n} | {b99:.3f} | " + " | ".join(vals) + " |")
    lines += ["", "TinyServe TTFT p99 / the best baseline's (target <= 0.8), one column per "
              "objective override (`--objective`); \"rates reported\": the slowed replicas "
              "measure and report their real rates (`--scenario-reported`)."]  # fmt: skip
    return "\n".join(lines)


_BASELINE_NAMES = frozenset({"dynamo_cost", "llmd_weighted", "power_of_two", "preble",
                             "round_robin", "session_hash", "sglang_cache_aware"})  # fmt: skip


def collect(out: Path, files: list[str], command: str) -> dict[str, Any]:
    rows = [r for f in files for r in load_rows(f)]
    doc = {"command": command, "sources": files, "runs": rows, "cells": scenario_cells(rows)}
    out.write_text(json.dumps(doc, indent=1))
    tables = [reward_scenarios(doc)] if doc["cells"] else []
    matrix = reward_matrix(doc)
    if matrix.count("\n") > 1:
        tables.append(matrix)
    out.with_suffix(".md").write_text(f"Command: `{command}`\n\n" + "\n\n".join(tables) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", help="routing_bench JSON for the headline table")
    ap.add_argument("--reward", help="scenario JSON (from --collect)")
    ap.add_argument("--reward-matrix", help="routing_bench rows with TinyServe R on and off")
    ap.add_argument("--collect", nargs="+", metavar=("OUT", "FILES"),
                    help="assemble routing_bench outputs into the scenario JSON OUT")
    ap.add_argument("--reward-levers", nargs="+", metavar="FILE",
                    help="routing_bench outputs: fault scenarios, baselines and TinyServe "
                    "under objective overrides (the reward's levers)")
    ap.add_argument("--rates", nargs="+", metavar=("CONFIGURED", "MEASURED"),
                    help="routing_bench outputs: TinyServe with --configured-rates, with the "
                    "measured rates, and optionally with the meter before the fit")
    ap.add_argument("--readme", default=str(README))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    cmd = "python -m benchmarks.readme_tables " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.collect:
        out, *files = args.collect
        collect(Path(out), files, cmd)
        print(Path(out).with_suffix(".md").read_text())
        return 0
    path = Path(args.readme)
    text = new = path.read_text()
    if args.routing:
        new = replace_section(new, "routing-headline",
                              routing_headline(json.loads(Path(args.routing).read_text())))  # fmt: skip
    if args.reward:
        new = replace_section(new, "reward-scenarios",
                              reward_scenarios(json.loads(Path(args.reward).read_text())))  # fmt: skip
    if args.reward_matrix:
        rows = load_rows(args.reward_matrix)
        new = replace_section(new, "reward-matrix", reward_matrix({"runs": rows}))
    if args.reward_levers:
        rows = [r for f in args.reward_levers for r in load_rows(f)]
        new = replace_section(new, "reward-levers", reward_levers(rows))
    if args.rates:
        if not 2 <= len(args.rates) <= 3:
            raise SystemExit("--rates takes CONFIGURED MEASURED [BEFORE]")
        rows = [load_rows(f) for f in args.rates]
        new = replace_section(new, "rates-fit", rates_fit(*rows))
    return write_or_check(path, text, new, args.check)


if __name__ == "__main__":
    raise SystemExit(main())
