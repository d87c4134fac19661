"""One large simulator run (issue 7: 256 replicas x 1M requests) with progress and run time.

    nice -n 10 python -m benchmarks.scale_run --workload generated_shared_prefix \
        --policy tinyserve --replicas 256 --requests 1000000 \
        --out benchmarks/results/scale256_1m 2> scale256_1m.log

The workload is built at ``scale = replicas / 8`` (per-replica load of the 8-replica design
point) with its request-count parameter set so that it has about ``--requests`` requests
(``REQUEST_KNOB``). The run keeps no per-request objects beyond the workload itself (the
simulator streams completions into compact columns, ``keep_records=False``). Writes
``<out>.json`` (figures, wall and CPU time, peak RSS, the exact command) and ``<out>.md``;
progress (tqdm, requests completed) goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

import benchmarks.sim.policies  # noqa: F401  (registers load_only)
from benchmarks.sim.calibration import DEFAULT_CALIBRATION, load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig
from benchmarks.sim.runner import DESIGN_REPLICAS, objective_config
from benchmarks.workloads import build_workload

# workload -> (parameter that sets the request count, requests per unit of it at scale 1)
REQUEST_KNOB: dict[str, tuple[str, int]] = {
    "generated_shared_prefix": ("num_groups", 16),  # x prompts_per_group (default 16)
    "prefix_repetition": ("num_prompts", 1),
    "toolbench": ("num_requests", 1),
}


def request_overrides(workload: str, num_requests: int, scale: float) -> dict[str, Any]:
    """Overrides giving ``workload`` about ``num_requests`` requests at ``scale``."""
    if workload not in REQUEST_KNOB:
        raise SystemExit(f"--requests supports {sorted(REQUEST_KNOB)}, not {workload!r}")
    key, per_unit = REQUEST_KNOB[workload]
    return {key: max(1, math.ceil(num_requests / (scale * per_unit)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="generated_shared_prefix", choices=sorted(REQUEST_KNOB))
    ap.add_argument("--policy", default="tinyserve")
    ap.add_argument("--replicas", type=int, default=256)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objective", default="", help="JSON of ObjectiveConfig overrides")
    ap.add_argument("--load-metric", default="uncached_work")
    ap.add_argument("--calibration", default=str(DEFAULT_CALIBRATION))
    ap.add_argument("--out", default="benchmarks/results/scale_run")
    args = ap.parse_args(argv)

    scale = args.replicas / DESIGN_REPLICAS
    overrides = request_overrides(args.workload, args.requests, scale)
    t0 = time.perf_counter()
    workload = build_workload(args.workload, args.seed, scale, **overrides)
    build_s = time.perf_counter() - t0
    objective = json.loads(Path(args.objective).read_text()) if args.objective else {}
    objective = objective.get("objective", objective)
    cfg = SimConfig(args.replicas, args.policy, load_calibration(Path(args.calibration)),
                    objective=objective_config(objective), load_metric=args.load_metric,
                    seed=args.seed, keep_records=False)
    sim = ClusterSim(cfg, workload)
    n = len(workload)
    # NOTE: the workload (millions of tuples) never becomes garbage: keep it out of the cyclic
    # collector's scans, and collect the young generation less often (no effect on results).
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    print(f"{args.workload} x {n} requests, {args.replicas} replicas, {args.policy}; built in "
          f"{build_s:.0f} s", file=sys.stderr, flush=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        with tqdm(total=n, desc="requests", unit="req", mininterval=30.0, file=sys.stderr) as bar:
            summary = sim.run(progress=bar.update).to_dict()
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    doc = {
        "command": "python -m benchmarks.scale_run " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": platform.node(), "python": platform.python_version(),
        "workload_overrides": overrides, "workload_params": workload.params,
        "num_requests": n, "build_s": build_s, "sim_wall_s": wall, "sim_cpu_s": cpu,
        "wall_ms_per_request": 1000 * wall / n, "cpu_ms_per_request": 1000 * cpu / n,
        "peak_rss_gib": rss_gib, "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    s = summary
    md = (
        f"Command: `{doc['command']}`\n\n"
        f"{n:,} requests ({args.workload}, {overrides}), {args.replicas} replicas, {args.policy}: "
        f"simulator wall time {wall:.0f} s ({doc['wall_ms_per_request']:.2f} ms/request), CPU "
        f"{cpu:.0f} s ({doc['cpu_ms_per_request']:.2f} ms/request), workload build {build_s:.0f} s, "
        f"peak RSS {rss_gib:.1f} GiB, on a shared 2-core box (host {doc['host']}).\n\n"
        "| TTFT p50 s | p90 s | p99 s | throughput tok/s | hit ratio | imbalance | preempt | "
        "simulated s |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {s['ttft_p50_s']:.3f} | {s['ttft_p90_s']:.3f} | {s['ttft_p99_s']:.3f} | "
        f"{s['throughput_tok_s']:.0f} | {s['hit_ratio']:.3f} | {s['imbalance']:.2f} | "
        f"{s['num_preemptions']} | {s['makespan_s']:.1f} |\n"
    )
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
