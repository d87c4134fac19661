"""Real-cluster routing A/B (issue 9): the Serve app on N GPUs (or CPUs), one workload replayed
once per routing policy, back to back, over HTTP with the ``openai`` streaming client.

    # on a GPU machine, after `. scripts/gpu_site.sh` (Ray carried as a wheelhouse):
    python3 -m benchmarks.gpu_ab --device cuda --replicas 2 --make-llama1b /tmp/llama1b \\
        --tokenizer .whl/tokenizer --out $OUT/gpu_ab
    # one GPU shared by 2 replicas (0.5 GPU each, a fixed KV pool each), 2 seeds, a 470-s budget:
    python3 -m benchmarks.gpu_ab --device cuda --replicas 2 --gpus 1 --seeds 0 1 --budget-s 470 ...
    # smoke test here (SmolLM2 on CPU, short prompts, a few requests per replay):
    python -m benchmarks.gpu_ab --device cpu --max-requests 6 --warmup 2 --http-port 8123 \
        --workloads generated_shared_prefix --set generated_shared_prefix.system_prompt_len=256 \
        --set generated_shared_prefix.output_len=8 --policies pow2 tinyserve --out /tmp/ab/cpu

Policies (``POLICIES``): ours and the SGLang-/Dynamo-/llm-d-style policies run in the
selection service behind ``TinyServeRouter`` (one deployment; each request names its policy
with ``routing_policy``); Ray's own ``PrefixCacheAffinityRouter`` and Serve's power-of-two
router each get their own deployment. Every replay opens its conversations with a fresh nonce,
so it shares no KV with earlier replays: each policy starts from a pool full of stale blocks,
as a long-running server does. Per policy: TTFT p50/p90/p99 and TPOT (client side), output
tokens/s, prefix-hit token ratio (``usage.cached_tokens``), load imbalance (max/mean prompt
tokens per replica, from the pools' counters) and KV utilisation (pool usage sampled every
0.5 s). Writes ``<out>.json`` (every replay with its loadgen records; ``gpu_ab_sim.as_loadgen`` gives loadgen's exact shape), ``<out>.md``
and ``<out>.png`` (per replay with its seed, and the mean over seeds per workload and policy).

More replicas than GPUs (``--gpus``, default every visible device) share them: ``gpu_plan``
gives each a fraction of a GPU, and each keeps the fixed pool of ``--num-blocks`` (the engine
then sizes nothing from the GPU's free memory); ``kv_fit`` checks that the replicas' weights,
pools and overhead fit a GPU, and shrinks the pools if not. ``--budget-s`` (``Budget``) starts
no replay that would overrun it and still writes every replay that finished.

This file holds the command (flags, the engine's settings, the loop over deployments and
replays, the output files). The plan (``POLICIES``, ``PLAN``, GPU sharing, budget) is in
``gpu_ab_plan.py``; one deployment and one replay with its measures in ``gpu_ab_replay.py``;
the tables and plot in ``gpu_ab_report.py``; the random checkpoint in ``random_llama.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.gpu_ab_plan import (
    DEFAULT_POLICIES,
    PLAN,
    POLICIES,
    Budget,
    gpu_plan,
    kv_fit,
    replay_plan,
)
from benchmarks.gpu_ab_replay import APP, deploy, replay
from benchmarks.gpu_ab_replay import (
    tpot as tpot,  # NOTE: re-exported: tests import it here
)
from benchmarks.gpu_ab_report import mean_table, plot, table
from benchmarks.random_llama import LLAMA_1B, make_llama1b
from benchmarks.workloads import build_workload
from cluster.selector.objective_settings import objective_from_mapping, parse_assignments


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=0,
                    help="GPUs to spread the replicas over (0: every visible CUDA device); "
                    "more replicas than GPUs share them (gpu_plan), each with its own pool")
    ap.add_argument("--model", default="default", help="checkpoint dir, or 'default' (SmolLM2)")
    ap.add_argument("--make-llama1b", default="", help="write a random 1B Llama here and serve it")
    ap.add_argument("--tokenizer", default=".whl/tokenizer", help="tokenizer files for it")
    ap.add_argument("--num-blocks", type=int, default=0,
                    help="KV blocks per replica (0: B2B SaaS's working set is 73%% of the pool)")
    ap.add_argument("--workloads", nargs="+", default=list(PLAN))
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, choices=list(POLICIES))
    ap.add_argument("--rate", action="append", default=[], metavar="WORKLOAD=X",
                    help="rate multiplier over the workload's design rate")
    ap.add_argument("--set", action="append", default=[], metavar="WORKLOAD.PARAM=JSON",
                    help="workload builder override, e.g. b2b_saas.stage_s=4")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=JSON",
                    help="EngineConfig override, e.g. stream_interval=8")
    ap.add_argument("--objective", action="append", default=[], metavar="KEY=JSON",
                    help="TinyServe objective override for the selection service "
                    "(cluster.selector.objective.ObjectiveConfig), e.g. temperature=2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="several seeds in one run (overrides --seed)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no replay that would end past this many seconds from the start "
                    "(Budget); what finished is written. 0 = no budget")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--warmup", type=int, default=16, help="warm-up requests per deployment")
    ap.add_argument("--max-requests", type=int, default=0)
    ap.add_argument("--out", required=True, help="output path prefix (.json/.md/.png)")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    seeds = args.seeds if args.seeds else [args.seed]
    for item in args.rate:
        name, _, x = item.partition("=")
        PLAN[name] = (PLAN[name][0], float(x), PLAN[name][2])
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, param = key.partition(".")
        PLAN[name][2][param] = json.loads(value)

    import ray
    from ray import serve

    model = args.model
    if args.make_llama1b:
        model = str(make_llama1b(Path(args.make_llama1b), Path(args.tokenizer)))
    b2b = PLAN["b2b_saas"]
    num_blocks = args.num_blocks or build_workload(
        "b2b_saas", seeds[0], b2b[0] * args.replicas / 2, **b2b[2]).kv_blocks_per_replica
    engine: dict[str, Any] = {"model": model, "device": args.device,
                              "num_blocks": num_blocks, "block_size": 16}
    gpu, plan, fit = "cpu", {"gpus": 0, "replicas": args.replicas, "replicas_per_gpu": 0,
                             "num_gpus_per_replica": 0.0, "gpus_used": 0}, None
    if args.device == "cuda":
        import torch

        engine.update(dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=8192)
        plan = gpu_plan(args.replicas, args.gpus or torch.cuda.device_count())
        gpu = torch.cuda.get_device_name(0)
        cfg = Path(model) / "config.json"
        if plan["replicas_per_gpu"] > 1 and cfg.exists():
            # NOTE: a fixed pool per replica: the engine then sizes nothing from the GPU's free
            # memory (kv_cache_memory_fraction applies only when num_blocks is None).
            fit = kv_fit(num_blocks, plan["replicas_per_gpu"],
                         torch.cuda.get_device_properties(0).total_memory,
                         json.loads(cfg.read_text()))
            if not fit["fits"]:
                print(f"== {num_blocks} KV blocks x {plan['replicas_per_gpu']} replicas do not "
                      f"fit one GPU: {fit['max_blocks']} blocks per replica", flush=True)
                num_blocks = engine["num_blocks"] = fit["max_blocks"]
        if plan["replicas_per_gpu"] > 1:
            engine["kv_cache_memory_fraction"] = round(0.85 / plan["replicas_per_gpu"], 4)
    else:
        engine.update(num_blocks=min(num_blocks or 2048, 2048), max_num_seqs=8, num_threads=1)
    objective = parse_assignments(args.objective)
    objective_from_mapping(objective)  # NOTE: a bad key or value fails here, before Ray starts
    for item in args.engine:
        key, _, value = item.partition("=")
        engine[key] = json.loads(value)
    where = (f"{args.replicas} x {gpu}" if plan["replicas_per_gpu"] <= 1 else
             f"{args.replicas} replicas sharing {plan['gpus_used']} x {gpu}")
    print(f"== {where}: {plan['num_gpus_per_replica']} GPU and {engine['num_blocks']} KV "
          f"blocks per replica; "
          f"seeds {seeds}; budget {args.budget_s or 'none'}", flush=True)
    # NOTE: enough logical CPUs for replicas + ingress + selector even on a 2-core box.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4 * args.replicas + 4),
             num_gpus=plan["gpus_used"], include_dashboard=False)
    http = f"http://127.0.0.1:{args.http_port}"
    serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    deploy_s: dict[str, float] = {}
    routers: dict[str, list[str]] = {}
    for p in args.policies:
        routers.setdefault(POLICIES[p][0], []).append(p)
    order = replay_plan(routers, args.workloads, seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(results: list[dict[str, Any]], partial: bool) -> str:
        """<out>.json and .md of what finished (after every replay: a run killed past its
        command's limit keeps them), and .png at the end."""
        rows = [r["summary"] for r in results]
        meta = {"benchmark": "gpu_ab", "gpu": gpu, "num_replicas": args.replicas,
                "gpus": plan["gpus_used"], "replicas_per_gpu": plan["replicas_per_gpu"],
                "num_gpus_per_replica": plan["num_gpus_per_replica"], "kv_fit": fit,
                "model": model, "arch": LLAMA_1B if args.make_llama1b else "smollm2-135m",
                "engine": engine, "objective": objective,
                "plan": {w: PLAN[w] for w in args.workloads},
                "seeds": seeds, "budget_s": args.budget_s, "elapsed_s": budget.elapsed(),
                "deploy_s": deploy_s, "skipped": skipped, "partial": partial}
        out.with_suffix(".json").write_text(json.dumps({**meta, "runs": results}))
        md = (f"# Routing A/B on {where}\n\nSeeds {seeds}; {len(rows)} replays in "
              f"{budget.elapsed():.0f} s" + (f", {len(skipped)} skipped (budget)" if skipped
                                             else "") + (" (still running)" if partial else "")
              + ".\n\n## Every replay\n\n" + table(rows) + "\n\n## Mean over seeds\n\n"
              + mean_table(rows) + "\n")
        out.with_suffix(".md").write_text(md)
        if rows and not partial:
            plot(rows, out.with_suffix(".png"), where)
        return md

    # NOTE: a SIGTERM (e.g. `timeout`) unwinds through the finally below, which writes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for i, (router, replays) in enumerate(order):
            if args.budget_s and budget.elapsed() + max(deploy_s.values(), default=0.0) \
                    > args.budget_s:
                print(f"== router={router} skipped: budget ({budget.elapsed():.0f} s gone)",
                      flush=True)
                skipped += [{"seed": s, "workload": w, "policy": p} for s, w, p in replays]
                continue
            deploy_s[router] = deploy(router, engine, args.replicas, args.device, http,
                                      plan["num_gpus_per_replica"], objective)
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"{http}/v1/models") as r:
                served = json.loads(r.read())["data"][0]["id"]
            # NOTE: warm-up (first-request compilation, CUDA graphs) outside any measurement.
            replay(http, served, "generated_shared_prefix", 99, routers[router][0], "warmup",
                   args.warmup, args.replicas)
            deploy_s[router] += time.perf_counter() - t0
            budget.open_deployment(len(replays), sum(len(r) for _, r in order[i + 1:]),
                                   len(order) - i - 1, deploy_s[router])
            for s, w, p in replays:
                if not budget.allows(w):
                    print(f"   s{s} {w:24s} {p:20s} skipped: budget ({budget.elapsed():.0f} s "
                          f"gone)", flush=True)
                    skipped.append({"seed": s, "workload": w, "policy": p})
                    continue
                results.append(replay(http, served, w, s, p, f"{p}-{w}-s{s}-{len(results)}",
                                      args.max_requests, args.replicas))
                budget.record(w, results[-1]["summary"]["wall_s"])
                write(results, True)
            serve.delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()
        md = write(results, False)
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
