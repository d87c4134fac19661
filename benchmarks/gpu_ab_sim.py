"""What the simulator predicts for a real routing A/B (``benchmarks/gpu_ab.py`` output): every
replay whose policy the simulator has is re-run in it with the same workload, seed, scale,
arrival times, replica count and pool size, under a calibration; real vs simulated TTFT
p50/p99, output tokens/s and hit ratio per (workload, policy), flagged beyond --tolerance.

    python -m benchmarks.gpu_ab_sim --ab benchmarks/results/gpu_ab/gpu_ab_h200x2.json \\
        --calibration benchmarks/sim/calibration/h200_llama1b_measured.json \\
        --out benchmarks/results/gpu_ab/sim_vs_real_h200x2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.sim.calibration import load_calibration
from benchmarks.sim.cluster import SimConfig
from benchmarks.sim_vs_real import TOLERANCE, compare

# gpu_ab policy label -> simulator policy (Ray's PrefixCacheAffinityRouter has no model here)
SIM_POLICY = {"tinyserve": "tinyserve", "sglang_cache_aware": "sglang_cache_aware",
              "dynamo_cost": "dynamo_cost", "llmd_weighted": "llmd_weighted",
              "pow2": "power_of_two"}
SHOWN = ("ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "hit_ratio")


def as_loadgen(run: dict[str, Any]) -> dict[str, Any]:
    """A gpu_ab replay in loadgen's JSON shape (``set`` as KEY=JSON strings)."""
    a = dict(run["args"])
    a["set"] = [f"{k}={json.dumps(v)}" for k, v in (a.get("set") or {}).items()]
    return {"args": a, "records": run["records"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ab", required=True, help="gpu_ab output JSON")
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--out", required=True, help="output prefix (.json/.md)")
    args = ap.parse_args(argv)
    ab = json.loads(Path(args.ab).read_text())
    model = load_calibration(args.calibration)
    rows = []
    for run in ab["runs"]:
        s = run["summary"]
        policy = SIM_POLICY.get(s["policy"])
        if policy is None:
            continue
        cfg = SimConfig(num_replicas=ab["num_replicas"], policy=policy, model=model,
                        num_blocks=ab["engine"]["num_blocks"],
                        eviction=ab["engine"].get("eviction", "adaptive"))
        row = compare(as_loadgen(run), cfg, args.tolerance)
        rows.append({"workload": s["workload"], "policy": s["policy"], **row})
        d = row["diff_sim_tokens"]
        print(f"{s['workload']:24s} {s['policy']:20s} " + " ".join(
            f"{m} {row['real'][m]:.3f}/{row['sim_tokens'][m]:.3f} ({d[m]['rel_diff']:+.0%})"
            for m in SHOWN), flush=True)
    lines = [f"# Simulated vs real: {ab['num_replicas']} x {ab['gpu']}", "",
             f"Real: `{args.ab}`. Simulator: `{args.calibration}` ({model.gpu}), the real run's "
             f"pool ({ab['engine']['num_blocks']} blocks per replica), real token counts "
             "(`sim_vs_real` token matching). Cells: real / simulated (difference); **bold** "
             f"beyond {args.tolerance:.0%}.", "",
             "| workload | policy | " + " | ".join(SHOWN) + " |", "|---|---|" + "---|" * len(SHOWN)]
    for r in rows:
        cells = []
        for m in SHOWN:
            d = r["diff_sim_tokens"][m]
            txt = f"{r['real'][m]:.3f} / {r['sim_tokens'][m]:.3f} ({d['rel_diff']:+.0%})"
            cells.append(f"**{txt}**" if d["flag"] else txt)
        lines.append(f"| {r['workload']} | {r['policy']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(
        {"ab": args.ab, "calibration": args.calibration, "runs": rows}, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
