"""Compaction on the chat replay: contiguity and fragmentation with and without it, and what
each compaction costs (issue 20 item 3).

    python benchmarks/compaction_bench.py [--seeds 3] [--settings 1:1,1:16,1:0] [--json out.json]

The replay is ``kv_pool_bench.replay`` (4,096 blocks of 16 tokens, shared system prompts, best
fit + adaptive eviction). Between steps it runs the engine's trigger (``replicas.compaction``:
compact once ``min_split_allocations`` = 1 allocation split a sequence since the last
compaction and ``min_interval_steps`` steps have passed) and the pool's contiguous plan
(whole-pool layout once ``full_layout_after`` split sequences found no window), with
the K/V of every block in a CPU tensor of ``--bytes-per-block`` (default: one layer of
SmolLM2-135M in fp32, 24 KiB) so the copy is real. Reports, median over seeds:
``seqs_in_le2_runs`` (finished sequences whose blocks sit in <= 2 contiguous runs),
F_total and external fragmentation (time averages, and the medians right before / after
each compaction), triggers and compactions (a trigger
whose plan moves nothing is not counted as a compaction), blocks moved per compaction and per
replay step, and CPU ms per compaction split into planning, copy and bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.kv_pool_bench import BS, _table, replay
from kvmanager.compaction import compose, copy_blocks_reference
from kvmanager.manager import KVCacheManager
from replicas.config import CompactionConfig


class _Trigger:
    """The engine's trigger and execution (replicas.compaction.Compactor) over a bare pool."""

    def __init__(self, cfg: CompactionConfig, num_blocks: int, bytes_per_block: int) -> None:
        self.cfg = cfg
        self.cache = torch.zeros((num_blocks, max(1, bytes_per_block // 4)), dtype=torch.float32)
        self.steps = self.last = self.seen = self.triggers = 0
        self.plan_s: list[float] = []
        self.copy_s: list[float] = []
        self.apply_s: list[float] = []
        self.moved: list[int] = []
        self.f_total: list[tuple[float, float]] = []  # (before, after) each compaction
        self.ext: list[tuple[float, float]] = []

    def __call__(self, m: KVCacheManager) -> None:
        self.steps += 1
        if (
            m.num_split_allocations - self.seen < self.cfg.min_split_allocations
            or self.steps - self.last < self.cfg.min_interval_steps
        ):
            return
        before = m.stats()
        t0 = time.perf_counter()
        plan = m.plan_contiguous_compaction(self.cfg.keep_free_blocks, self.cfg.full_layout_after)
        t1 = time.perf_counter()
        remap = compose(plan.moves)
        copy_blocks_reference([self.cache], list(remap), list(remap.values()))
        t2 = time.perf_counter()
        m.apply_compaction(plan)
        t3 = time.perf_counter()
        self.last, self.seen = self.steps, m.num_split_allocations
        self.triggers += 1
        if not remap:
            return  # NOTE: nothing could move (no window, no spare block): not a compaction
        self.plan_s.append(t1 - t0)
        self.copy_s.append(t2 - t1)
        self.apply_s.append(t3 - t2)
        self.moved.append(len(remap))
        after = m.stats()
        self.f_total.append((before.f_total, after.f_total))
        self.ext.append((before.external_fragmentation, after.external_fragmentation))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    settings: list[tuple[str, int | None, int | None]] = [("off", None, None)]
    for item in args.settings.split(","):
        interval, full = item.split(":")
        settings.append(("on", int(interval), int(full)))
    for name, interval, full in settings:
        per_seed: list[dict[str, float]] = []
        for seed in range(args.seeds):
            trig = None
            if interval is not None:
                cfg = CompactionConfig(min_interval_steps=interval, full_layout_after=full)
                trig = _Trigger(cfg, args.blocks, args.bytes_per_block)
            r = replay("best_fit", "adaptive", args.blocks, args.requests, seed, trig)
            n = len(trig.moved) if trig else 0
            ms = lambda xs: 1000 * statistics.median(xs) if xs else 0.0  # noqa: E731
            med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
            per_seed.append(
                {
                    "seqs_in_le2_runs": r["seqs_in_le2_runs"],
                    "f_total_avg": r["f_total_avg"],
                    "external_fragmentation_avg": r["external_fragmentation_avg"],
                    "prefix_hit_ratio": r["prefix_hit_ratio"],
                    "num_steps": r["num_steps"],
                    "num_triggers": trig.triggers if trig else 0,
                    "num_compactions": n,
                    "blocks_moved_per_compaction": statistics.median(trig.moved) if n else 0,
                    "blocks_moved_per_step": sum(trig.moved) / r["num_steps"] if trig else 0.0,
                    "f_total_before": med([b for b, _ in trig.f_total]) if n else 0.0,
                    "f_total_after": med([a for _, a in trig.f_total]) if n else 0.0,
                    "ext_frag_before": med([b for b, _ in trig.ext]) if n else 0.0,
                    "ext_frag_after": med([a for _, a in trig.ext]) if n else 0.0,
                    "plan_ms": ms(trig.plan_s) if trig else 0.0,
                    "copy_ms": ms(trig.copy_s) if trig else 0.0,
                    "apply_ms": ms(trig.apply_s) if trig else 0.0,
                }
            )
            print(f"  {name} {interval}:{full} seed={seed} done", file=sys.stderr)
        row: dict[str, Any] = {
            "compaction": name,
            "min_interval_steps": "-" if interval is None else interval,
            "full_layout_after": "-" if full is None else full,
        }
        for key in per_seed[0]:
            row[key] = statistics.median(p[key] for p in per_seed)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--settings",
        default="1:1,1:16,1:0,4:16,16:16",
        help="min_interval_steps:full_layout_after pairs to run (besides compaction off)",
    )
    ap.add_argument("--bytes-per-block", type=int, default=2 * 16 * 3 * 64 * 4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = run(args)
    text = (
        f"## Chat replay, {args.blocks} blocks of {BS} tokens, median over {args.seeds} seeds\n\n"
        + _table(rows)
        + "\n\n# command: python benchmarks/compaction_bench.py "
        + " ".join(sys.argv[1:])
        + "\n"
    )
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "args": vars(args) | {"json": str(args.json)}}, indent=1))
        args.json.with_suffix(".md").write_text(text)  # NOTE: generated from the same rows


if __name__ == "__main__":
    main()
