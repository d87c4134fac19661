"""Simulated vs real: replay a load generator run (``benchmarks/loadgen.py`` output JSON) in
the cluster simulator with a calibration, and compare the figures.

The simulator gets the SAME workload: name, seed, scale, ``--set`` overrides and
``--max-requests`` truncation are read from the loadgen JSON's ``args``; arrival times and
think times are multiplied by loadgen's ``--time-scale`` (the real run sent request i at
``arrival_s * time_scale``), so with a calibration of the machine that served it the simulated
seconds are wall seconds. Policy, replica count and pool size are what the real cluster ran
(flags; defaults = ``deploy/app.yaml``: tinyserve, 2 replicas, the calibration's pool).

Two simulated columns:

- ``sim``: the workload spec as written (block-granular prompts, spec output lengths);
- ``sim_tokens``: the same requests with the REAL token counts where the real run knows them:
  each request's output length = its real ``completion_tokens`` (the model may stop at EOS),
  a multi-turn history carries the parent's real answer length, and the chat template's
  overhead (median real - spec prompt tokens of first turns) becomes shared header blocks.

Figures (loadgen's and the simulator's names): TTFT p50/p90/p99, output tokens/s (output
tokens / (last finish - first arrival)), prefix-hit token ratio (cached prompt tokens at first
admission / prompt tokens: the real ``cached_tokens`` vs the simulator's
``request_hit_ratio``). Relative difference = (sim - real) / real, flagged beyond --tolerance.

    python -m benchmarks.sim_vs_real --loadgen /tmp/lg_gsp.json /tmp/lg_chat.json \
        --calibration benchmarks/sim/calibration/cpu_smollm2_135m_measured.json \
        --replicas 2 --out benchmarks/results/sim_vs_real_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

import benchmarks.sim.policies  # noqa: F401  (registers load_only)
from benchmarks.loadgen import Replayer
from benchmarks.sim.calibration import StepTimeModel, load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig
from benchmarks.sim.fit import COEFFS
from benchmarks.workloads import SimRequest, Workload, build_workload
from benchmarks.workloads.types import blocks_for

METRICS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "throughput_tok_s", "hit_ratio")
TOLERANCE = 0.15


def scaled(model: StepTimeModel, factor: float) -> StepTimeModel:
    """``model`` with every time coefficient multiplied by ``factor``."""
    if factor == 1.0:
        return model
    return replace(model, **{k: getattr(model, k) * factor for k in COEFFS})


def replayed_workload(lg: dict[str, Any]) -> Workload:
    """The workload loadgen replayed (same truncation), arrivals and think times scaled."""
    a = lg["args"]
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in a.get("set", []))}
    w = build_workload(a["workload"], int(a["seed"]), float(a["scale"]), **overrides)
    reqs = Replayer(None, "", w, 1.0, int(a.get("max_requests", 0) or 0)).requests
    ts = float(a.get("time_scale", 1.0))
    scaled = [replace(r, arrival_s=r.arrival_s * ts, think_time_s=r.think_time_s * ts)
              for r in reqs]
    return Workload(w.name, w.seed, scaled, dict(w.params, time_scale=ts),
                    [(t0 * ts, t1 * ts, q / ts) for t0, t1, q in w.stages],
                    w.kv_blocks_per_replica, w.block_size).sort()


def token_matched(w: Workload, records: list[dict[str, Any]]) -> tuple[Workload, dict[str, Any]]:
    """``w`` with the real run's token counts (module docstring); returns it and what changed."""
    bs = w.block_size
    real = {r["request_id"]: r for r in records if not r.get("error")}
    next_id = 1 + max((c for r in w.requests for c in r.prompt_blocks + r.output_blocks),
                      default=0)

    def fresh(n: int) -> tuple[int, ...]:
        nonlocal next_id
        ids = tuple(range(next_id, next_id + n))
        next_id += n
        return ids

    deltas = [real[r.request_id]["num_prompt_tokens"] - len(r.prompt_blocks) * bs
              for r in w.requests if r.parent_id is None and r.request_id in real]
    header = fresh(max(0, round(statistics.median(deltas) / bs))) if deltas else ()
    by_id = {r.request_id: r for r in w.requests}
    done: dict[str, SimRequest] = {}

    def build(r: SimRequest) -> SimRequest:
        if r.request_id in done:
            return done[r.request_id]
        rec = real.get(r.request_id)
        n_out = max(1, int(rec["num_output_tokens"])) if rec else r.num_output_tokens
        k = blocks_for(n_out, bs)
        out = r.output_blocks[:k] + fresh(max(0, k - len(r.output_blocks)))
        if r.parent_id is None:
            prompt = header + r.prompt_blocks
        else:
            spec_parent = by_id[r.parent_id]
            parent = build(spec_parent)
            new = r.prompt_blocks[len(spec_parent.prompt_blocks) + len(spec_parent.output_blocks):]
            prompt = parent.prompt_blocks + parent.output_blocks + new
        done[r.request_id] = replace(r, prompt_blocks=prompt, output_blocks=out,
                                     num_output_tokens=n_out)
        return done[r.request_id]

    reqs = [build(r) for r in w.requests]
    info = {"header_blocks": len(header),
            "median_first_turn_prompt_delta_tokens": statistics.median(deltas) if deltas else 0,
            "spec_output_tokens": sum(r.num_output_tokens for r in w.requests),
            "real_output_tokens": sum(r.num_output_tokens for r in reqs)}
    return Workload(w.name, w.seed, reqs, w.params, w.stages, w.kv_blocks_per_replica, bs), info


def real_figures(records: list[dict[str, Any]]) -> dict[str, float]:
    ok = [r for r in records if not r.get("error")]
    if not ok:
        raise ValueError("the loadgen run has no successful request")
    ttft = np.asarray([r["first_token_s"] - r["arrival_s"] for r in ok])
    span = max(r["finish_s"] for r in ok) - min(r["arrival_s"] for r in ok)
    prompt = sum(r["num_prompt_tokens"] for r in ok)
    return {
        "num_requests": len(ok), "num_errors": len(records) - len(ok),
        "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p90_s": float(np.percentile(ttft, 90)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "throughput_tok_s": sum(r["num_output_tokens"] for r in ok) / max(span, 1e-9),
        "hit_ratio": sum(r["num_cached_tokens"] for r in ok) / prompt if prompt else 0.0,
        "prompt_tokens": prompt, "output_tokens": sum(r["num_output_tokens"] for r in ok),
        "makespan_s": span,
    }


def sim_figures(cfg: SimConfig, w: Workload) -> dict[str, float]:
    s = ClusterSim(cfg, w).run()
    return {
        "num_requests": s.num_requests, "ttft_p50_s": s.ttft_p50_s, "ttft_p90_s": s.ttft_p90_s,
        "ttft_p99_s": s.ttft_p99_s, "throughput_tok_s": s.throughput_tok_s,
        "hit_ratio": s.request_hit_ratio, "pool_hit_ratio": s.hit_ratio,
        "prompt_tokens": sum(len(r.prompt_blocks) for r in w.requests) * w.block_size,
        "output_tokens": sum(r.num_output_tokens for r in w.requests),
        "makespan_s": s.makespan_s, "busy_fraction": s.extra["busy_fraction"],
        "num_preemptions": s.num_preemptions, "imbalance": s.imbalance,
    }


def rel_diffs(real: dict[str, float], sim: dict[str, float], tol: float
              ) -> dict[str, dict[str, Any]]:
    out = {}
    for m in METRICS:
        r, s = real[m], sim[m]
        d = (s - r) / r if r else (0.0 if s == r else float("inf"))
        out[m] = {"rel_diff": d, "flag": bool(abs(d) > tol)}
    return out


def compare(lg: dict[str, Any], cfg: SimConfig, tol: float = TOLERANCE,
            step_time_factor: float = 1.0, ttft_overhead_s: float = 0.0) -> dict[str, Any]:
    """One loadgen run vs the simulator; JSON-ready. With ``step_time_factor`` != 1 or
    ``ttft_overhead_s`` a third column (``sim_scaled``) runs the token-matched workload with
    every step time scaled and the overhead outside the engine (HTTP, ingress, routing, stream)
    added to every TTFT."""
    w = replayed_workload(lg)
    real = real_figures(lg["records"])
    sim = sim_figures(cfg, w)
    wt, info = token_matched(w, lg["records"])
    sim_t = sim_figures(cfg, wt)
    row = {
        "workload": w.name, "loadgen_args": lg["args"], "num_requests": len(w.requests),
        "real": real, "sim": sim, "sim_tokens": sim_t, "token_matching": info,
        "diff_sim": rel_diffs(real, sim, tol), "diff_sim_tokens": rel_diffs(real, sim_t, tol),
        "step_time_factor": step_time_factor, "ttft_overhead_s": ttft_overhead_s,
    }
    if step_time_factor != 1.0 or ttft_overhead_s:
        cfg_s = replace(cfg, model=scaled(cfg.model, step_time_factor))
        fig = sim_figures(cfg_s, wt)
        for m in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"):
            fig[m] += ttft_overhead_s
        row["sim_scaled"] = fig
        row["diff_sim_scaled"] = rel_diffs(real, fig, tol)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], tol: float) -> str:
    names = {"ttft_p50_s": "TTFT p50 (s)", "ttft_p90_s": "TTFT p90 (s)",
             "ttft_p99_s": "TTFT p99 (s)", "throughput_tok_s": "output tok/s",
             "hit_ratio": "prefix-hit token ratio"}
    lines = [f"# Simulated vs real ({meta['replicas']} replicas, policy {meta['policy']})", "",
             f"Calibration: `{meta['calibration']}` ({meta['gpu']}). Columns: `sim` = the "
             "workload spec; `sim, real tokens` = real prompt/output token counts (chat "
             "template header, EOS stops); `x factor + overhead` = that with every step time "
             "multiplied by the run's measured CPU contention and the measured time outside the "
             "engine added to every TTFT. Differences are "
             f"(sim - real) / real; **bold** = beyond {tol:.0%}.", ""]
    for row in rows:
        a = row["loadgen_args"]
        cols = [("sim", "diff_sim", "sim"), ("sim_tokens", "diff_sim_tokens", "sim, real tokens")]
        if "sim_scaled" in row:
            over = row.get("ttft_overhead_s", 0.0)
            cols.append(("sim_scaled", "diff_sim_scaled",
                         f"sim, real tokens, x {row['step_time_factor']:.2f}"
                         + (f" + {over:.2f} s" if over else "")))
        lines += [f"## {row['workload']} (seed {a['seed']}, scale {a['scale']}, time-scale "
                  f"{a['time_scale']}, {row['num_requests']} requests"
                  + (f", set {' '.join(a['set'])}" if a.get("set") else "") + ")", "",
                  *([f"Real run: `{row['loadgen_file']}`.", ""] if "loadgen_file" in row else []),
                  "| metric | real | " + " | ".join(f"{c[2]} | diff" for c in cols) + " |",
                  "|---|---:|" + "---:|---:|" * len(cols)]
        for m in METRICS:
            cells = [names[m], f"{row['real'][m]:.3f}"]
            for col, diff, _ in cols:
                d = row[diff][m]
                txt = f"{d['rel_diff']:+.0%}"
                cells += [f"{row[col][m]:.3f}", f"**{txt}**" if d["flag"] else txt]
            lines.append("| " + " | ".join(cells) + " |")
        ti = row["token_matching"]
        lines += ["", f"Tokens: real prompt {row['real']['prompt_tokens']}, spec "
                  f"{row['sim']['prompt_tokens']}, matched {row['sim_tokens']['prompt_tokens']}; "
                  f"output real {row['real']['output_tokens']}, spec {ti['spec_output_tokens']}; "
                  f"header blocks {ti['header_blocks']}. Simulated busy fraction "
                  f"{row['sim']['busy_fraction']:.2f} (matched {row['sim_tokens']['busy_fraction']:.2f}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loadgen", nargs="+", required=True, help="loadgen --out JSON file(s)")
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--policy", default="tinyserve")
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="pool blocks per replica (default: the calibration's capacity)")
    ap.add_argument("--eviction", default=None,
                    help="pool eviction (default: the calibration's engine_config, else lru)")
    ap.add_argument("--step-time-factor", type=float, nargs="+", default=[1.0],
                    help="one per --loadgen file (or one for all): also simulate with every "
                    "step time multiplied by it (e.g. the CPU contention the real replicas saw: "
                    "wall / CPU time of their engine threads while busy)")
    ap.add_argument("--ttft-overhead-s", type=float, nargs="+", default=[0.0],
                    help="one per --loadgen file (or one for all): seconds outside the engine "
                    "(client -> ingress -> router -> replica, first chunk back) added to every "
                    "simulated TTFT of the scaled column")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    ap.add_argument("--out", default="", help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    model = load_calibration(args.calibration)
    factors, overheads = args.step_time_factor, args.ttft_overhead_s
    factors = factors * len(args.loadgen) if len(factors) == 1 else factors
    overheads = overheads * len(args.loadgen) if len(overheads) == 1 else overheads
    if len(factors) != len(args.loadgen) or len(overheads) != len(args.loadgen):
        ap.error("--step-time-factor / --ttft-overhead-s take one value, or one per --loadgen")
    cal = json.loads(Path(args.calibration).read_text())
    eviction = args.eviction or cal.get("engine_config", {}).get("eviction", "lru")
    cfg = SimConfig(num_replicas=args.replicas, policy=args.policy, model=model,
                    num_blocks=args.num_blocks, eviction=eviction)
    rows = [{"loadgen_file": p, **compare(json.loads(Path(p).read_text()), cfg, args.tolerance,
                                          f, o)}
            for p, f, o in zip(args.loadgen, factors, overheads, strict=True)]
    meta = {"calibration": args.calibration, "gpu": model.gpu, "replicas": args.replicas,
            "policy": args.policy, "num_blocks": args.num_blocks or model.kv_blocks(16),
            "eviction": eviction, "tolerance": args.tolerance, "loadgen": args.loadgen,
            "step_time_factors": factors, "ttft_overheads_s": overheads}
    md = markdown(rows, meta, args.tolerance)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
        out.with_suffix(".md").write_text(md + "\n")
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
