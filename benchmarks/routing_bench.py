"""Routing-quality benchmark: every workload x policy x cluster size x seed in the simulator.

    python -m benchmarks.routing_bench --sizes 8 32 --seeds 0 1 2 --jobs 2 \
        --out benchmarks/results/routing

writes ``<out>.json`` (every run, the medians, the target checks, the calibration's
provenance and the exact command), ``<out>.md`` (tables) and ``<out>_*.png`` (plots), and
prints the tables. ``--objective FILE`` applies TinyServe weight overrides (e.g. the best row
of ``sweep_weights``); ``--set workload.key=value`` overrides a workload parameter.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.sim.calibration import DEFAULT_CALIBRATION, load_calibration
from benchmarks.sim.policies import all_policies
from benchmarks.sim.replica import LOAD_METRICS
from benchmarks.sim.report import aggregate, markdown, plots, targets
from benchmarks.sim.runner import RunSpec, load_rows, run_specs
from benchmarks.sim.scenarios import SCENARIOS
from benchmarks.workloads import TRACE_PREFIX, WORKLOADS


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """``workload.key=value`` strings -> {workload: {key: json value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        lhs, _, value = item.partition("=")
        wl, _, key = lhs.partition(".")
        if not key or wl not in WORKLOADS:
            raise SystemExit(f"--set expects workload.key=value with a known workload, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(wl, {})[key] = parsed
    return out


def _spec_key(s: RunSpec) -> str:
    return json.dumps([s.workload, s.policy, s.num_replicas, s.seed, json.loads(s.workload_overrides),
                       json.loads(s.objective), json.loads(s.sim)], sort_keys=True)


def _key(row: dict[str, Any]) -> str:
    return json.dumps([row["workload"], row["policy"], row["num_replicas"], row["seed"],
                       row.get("workload_overrides", {}), row["objective_overrides"],
                       row["sim_overrides"]], sort_keys=True)


def build_specs(args: argparse.Namespace) -> list[RunSpec]:
    workloads = list(WORKLOADS) if args.workloads == ["all"] else list(args.workloads)
    # NOTE: getattr: other scripts build this Namespace by hand without the newer options.
    traces = getattr(args, "trace", [])
    workloads += [TRACE_PREFIX + t for t in traces]
    if traces and args.workloads == ["all"] and not getattr(args, "builtin_too", False):
        workloads = [TRACE_PREFIX + t for t in traces]
    policies = all_policies() if args.policies == ["all"] else args.policies
    objective = Path(args.objective).read_text() if args.objective else "{}"
    objective = json.dumps(json.loads(objective).get("objective", json.loads(objective)))
    sets = parse_sets(args.set)
    sim_kw: dict[str, Any] = {"event_lag_s": args.event_lag,
                              "snapshot_interval_s": args.snapshot_interval,
                              "load_metric": args.load_metric,
                              "share_in_step": args.share_in_step == "on"}
    # NOTE: only when set, so rows of runs without a scenario keep their earlier keys (--reuse)
    if getattr(args, "scenario", ""):
        sim_kw["scenario"] = args.scenario
    if getattr(args, "scenario_reported", False):
        sim_kw["scenario_reported"] = True
    if getattr(args, "configured_rates", False):
        sim_kw["report_rates"] = False
    if getattr(args, "oracle", ""):
        sim_kw["oracle"] = args.oracle
    sim = json.dumps(sim_kw)
    specs = []
    for n in args.sizes:
        for wl in workloads:
            for seed in args.seeds:
                for p in policies:
                    specs.append(RunSpec(wl, p, n, seed, json.dumps(sets.get(wl, {})),
                                         objective if p == "tinyserve" else "{}", sim,
                                         str(args.calibration),
                                         records_dir=getattr(args, "records", "")))
    return specs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["all"],
                    help=f"'all' or of {list(WORKLOADS)}, or trace:FILE")
    ap.add_argument("--trace", action="append", default=[],
                    help="JSONL trace file to replay (schema: benchmarks/workloads/trace.py); "
                    "repeatable; replaces the built-in workloads unless --builtin-too")
    ap.add_argument("--builtin-too", action="store_true",
                    help="with --trace and --workloads all: run the built-in workloads too")
    ap.add_argument("--records", default="",
                    help="directory: write every run's per-request records there (JSONL)")
    ap.add_argument("--policies", nargs="+", default=["all"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[8])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--objective", default="", help="JSON of ObjectiveConfig overrides")
    ap.add_argument("--set", action="append", default=[], help="workload.key=value override")
    ap.add_argument("--event-lag", type=float, default=0.02, help="KV event lag (s)")
    ap.add_argument("--load-metric", default="uncached_work", choices=LOAD_METRICS,
                    help="what replicas report as running tokens (uncached_work = the product's "
                    "replicas/deployment.py since this session; inflight_tokens = before)")
    ap.add_argument("--snapshot-interval", type=float, default=0.05, help="load snapshot period (s)")
    ap.add_argument("--share-in-step", choices=("on", "off"), default="on",
                    help="blocks hashed when scheduled, so a request admitted in the same step "
                    "reuses them (on = replicas/scheduler.py since the fourth session; off = "
                    "hashed after the step, as before the third session)")
    ap.add_argument("--scenario", default="", choices=("", *SCENARIOS),
                    help="fault scenario (benchmarks/sim/scenarios.py): hetero = a quarter of "
                    "the replicas at half speed, slowdown = one replica at a third of its speed "
                    "mid-run, lossy_events = 10%% of one replica's KV events lost")
    ap.add_argument("--scenario-reported", action="store_true",
                    help="slowed replicas measure and report their real rates (default: they "
                    "report their nominal ones, i.e. they are slower than their reports)")
    ap.add_argument("--configured-rates", action="store_true",
                    help="replicas report no measured rates, so the objective's configured "
                    "prefill_tokens_per_s stands in (before issue 20; to compare)")
    ap.add_argument("--oracle", default="",
                    help="BENCHMARK-ONLY upper bound, not a product mode: the selection core is "
                    "given the true speed / cache / load ('all' or e.g. speed+cache; "
                    "benchmarks/sim/oracle.py)")
    ap.add_argument("--calibration", default=str(DEFAULT_CALIBRATION))
    ap.add_argument("--out", default="benchmarks/results/routing")
    ap.add_argument("--reuse", nargs="*", default=[],
                    help="earlier outputs (.json or .partial.jsonl): identical specs are not re-run")
    ap.add_argument("--reuse-only", action="store_true",
                    help="report only specs found in --reuse files (assemble, run nothing)")
    args = ap.parse_args(argv)

    specs = build_specs(args)
    done = {_key(r): r for path in args.reuse for r in load_rows(path)}
    if args.reuse_only:
        specs = [s for s in specs if _spec_key(s) in done]
    todo = [s for s in specs if _spec_key(s) not in done]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} reused from {args.reuse}")
    t0 = time.perf_counter()
    fresh = iter(run_specs(todo, args.jobs, desc="routing_bench",
                           partial=Path(args.out).with_suffix(".partial.jsonl")))
    rows = [done[_spec_key(s)] if _spec_key(s) in done else next(fresh) for s in specs]
    wall = time.perf_counter() - t0
    agg = aggregate(rows)
    tg = targets(agg)
    table = markdown(agg, tg)
    print(table)
    cal = load_calibration(args.calibration)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "python -m benchmarks.routing_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": wall, "host": platform.node(), "python": platform.python_version(),
        "calibration": {"name": cal.name, "gpu": cal.gpu, "model": cal.model,
                        "provenance": cal.provenance},
        "runs": rows, "median": agg, "targets": tg,
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(
        f"Command: `{doc['command']}`\n\nCalibration: {cal.name} ({cal.gpu}; {cal.provenance})\n\n"
        f"Total wall time {wall:.0f} s.\n\n" + table)
    for p in plots(agg, out.parent / out.name):
        print("wrote", p)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
