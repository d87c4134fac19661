"""TinyServe pool benchmark: allocation/lookup cost and a chat-like replay.

    python benchmarks/kv_pool_bench.py [--sizes 4096,65536,1048576] [--json out.json]

Part 1 (cost per block, same op sequence for every pool): fill a pool to 75% with requests of
1-64 blocks, then churn (free a random request, allocate a new one) and report ns per block
allocated+freed; prefix lookup of 64-block cached prompts, ns per block including hashing.
Pools: our best-fit and first-free, and vLLM's v1 ``BlockPool`` (a FIFO free list) as the
baseline when vLLM imports.

Part 2 (chat replay, 4,096 blocks of 16 tokens): shared system prompts (Zipf over 24), user
turns and outputs of mixed lengths, admission held at 80-95% pool occupancy, one decode token
per running request per step. Reports time-averaged vLLM-paper utilisation, external
fragmentation, F_total, the share of finished sequences whose blocks sit in <= 2 contiguous
runs, and the prefix hit ratio, for best-fit/first-free x LRU/adaptive.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmanager.config import PoolConfig
from kvmanager.manager import KVCacheManager

BS = 16


# -- part 1: cost per block ---------------------------------------------------------------------
def _churn_ops(num_blocks: int, num_ops: int, seed: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Initial request sizes (to 75% occupancy) and (victim index, new size) churn ops."""
    rng = random.Random(seed)
    sizes, total = [], 0
    while total < 0.75 * num_blocks:
        sizes.append(rng.randint(1, 64))
        total += sizes[-1]
    ops = [(rng.randrange(1 << 30), rng.randint(1, 64)) for _ in range(num_ops)]
    return sizes, ops


class _OurPool:
    def __init__(self, num_blocks: int, allocator: str) -> None:
        self.m = KVCacheManager(PoolConfig(num_blocks=num_blocks, block_size=BS, allocator=allocator))
        self.n = 0

    def alloc(self, size: int) -> Any:
        self.n += 1
        rid = str(self.n)
        got = self.m.allocate_slots(rid, range(size * BS), size * BS)
        assert got is not None
        return rid

    def free(self, handle: Any) -> None:
        self.m.free(handle)


class _VllmPool:
    def __init__(self, num_blocks: int) -> None:
        from vllm.v1.core.block_pool import BlockPool

        self.p = BlockPool(num_blocks + 1, enable_caching=True, hash_block_size=BS)  # +null block

    def alloc(self, size: int) -> Any:
        return self.p.get_new_blocks(size)

    def free(self, handle: Any) -> None:
        self.p.free_blocks(reversed(handle))


def _time_churn(make: Callable[[], Any], num_blocks: int, num_ops: int, seed: int) -> float:
    sizes, ops = _churn_ops(num_blocks, num_ops, seed)
    pool = make()
    live = [(pool.alloc(s), s) for s in sizes]
    moved = 0
    gc.collect()
    gc.disable()  # NOTE: same for every pool; vLLM itself freezes GC after start-up
    t0 = time.perf_counter()
    for victim, size in ops:
        handle, old = live[victim % len(live)]
        pool.free(handle)
        live[victim % len(live)] = (pool.alloc(size), size)
        moved += old + size
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed / moved * 1e9


def _time_lookup_ours(num_blocks: int, mode: str, reps: int) -> float:
    m = KVCacheManager(PoolConfig(num_blocks=num_blocks, block_size=BS, hash_mode=mode))
    prompts = [[p * 100_000 + i for i in range(64 * BS + 1)] for p in range(8)]
    for i, toks in enumerate(prompts):
        m.allocate_slots(f"p{i}", toks, len(toks))
        m.commit(f"p{i}", toks, len(toks))
    t0 = time.perf_counter()
    for r in range(reps):
        hit = m.lookup_prefix(prompts[r % len(prompts)])
        assert len(hit.block_ids) == 64
    return (time.perf_counter() - t0) / (reps * 64) * 1e9


def _time_lookup_vllm(num_blocks: int, reps: int) -> float:
    import vllm.v1.core.kv_cache_utils as kcu
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.block_pool import BlockPool

    kcu.init_none_hash(sha256_cbor)
    pool = BlockPool(num_blocks + 1, enable_caching=True, hash_block_size=BS)
    prompts = [[p * 100_000 + i for i in range(64 * BS + 1)] for p in range(8)]
    for toks in prompts:  # populate its hash map the way cache_full_blocks leaves it
        parent = None
        for i, block in enumerate(pool.get_new_blocks(64)):
            parent = kcu.hash_block_tokens(sha256_cbor, parent, toks[i * BS : (i + 1) * BS])
            key = kcu.make_block_hash_with_group_id(parent, 0)
            pool._insert_block_hash(key, block, num_tokens=(i + 1) * BS)
    t0 = time.perf_counter()
    for r in range(reps):
        toks, parent, found = prompts[r % len(prompts)], None, 0
        for i in range(64):  # its request block hasher + find_longest_cache_hit loop
            parent = kcu.hash_block_tokens(sha256_cbor, parent, toks[i * BS : (i + 1) * BS])
            if pool.get_cached_block(parent, [0]) is None:
                break
            found += 1
        assert found == 64
    return (time.perf_counter() - t0) / (reps * 64) * 1e9


def bench_costs(sizes: list[int], num_ops: int, reps: int) -> list[dict[str, Any]]:
    try:
        import vllm.v1.core.block_pool  # noqa: F401

        have_vllm = True
    except ImportError:
        have_vllm = False
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"num_blocks": n}
        for name, make in [
            ("best_fit", lambda n=n: _OurPool(n, "best_fit")),
            ("first_free", lambda n=n: _OurPool(n, "first_free")),
            *([("vllm_blockpool", lambda n=n: _VllmPool(n))] if have_vllm else []),
        ]:
            runs = [_time_churn(make, n, num_ops, seed) for seed in range(3)]
            row[f"alloc_free_ns_per_block_{name}"] = statistics.median(runs)
        row["lookup_ns_per_block_ours_fast"] = _time_lookup_ours(n, "fast", reps)
        row["lookup_ns_per_block_ours_vllm_hash"] = _time_lookup_ours(n, "vllm", reps)
        if have_vllm:
            base = row["alloc_free_ns_per_block_vllm_blockpool"]
            row["best_fit_vs_vllm_ratio"] = row["alloc_free_ns_per_block_best_fit"] / base
            row["lookup_ns_per_block_vllm"] = _time_lookup_vllm(n, reps)
        rows.append(row)
        print(f"  cost rows done for {n} blocks", file=sys.stderr)
    return rows


# -- part 2: chat-like replay -------------------------------------------------------------------
@dataclass(slots=True)
class _Seq:
    rid: str
    tokens: list[int]
    remaining: int
    prompt: list[int]
    out_len: int


def replay(
    allocator: str, eviction: str, num_blocks: int, num_requests: int, seed: int,
    between_steps: Callable[[KVCacheManager], None] | None = None,
) -> dict[str, float]:
    """One chat replay; ``between_steps(pool)`` runs after every step (compaction_bench)."""
    rng = random.Random(seed)
    m = KVCacheManager(
        PoolConfig(num_blocks=num_blocks, block_size=BS, allocator=allocator, eviction=eviction)
    )
    systems = [[s * 1_000_000 + i for i in range(rng.choice([256, 512, 768, 1024]))] for s in range(24)]
    weights = [1 / (k + 1) for k in range(len(systems))]  # Zipf(1) popularity
    pending = []
    for i in range(num_requests):
        sys_prompt = rng.choices(systems, weights)[0]
        user = [rng.randrange(2_000_000, 3_000_000) for _ in range(rng.randint(16, 384))]
        pending.append((f"q{i}", sys_prompt + user, rng.randint(16, 512)))
    running: list[_Seq] = []
    util, ext, ftot, occ, committed = [], [], [], [], []
    runs_ok = finished = preempted = 0
    stalled = False
    while pending or running:
        # NOTE: admission counts blocks in use plus growth reservations (the scheduler's view
        # of committed space), holding it under 90%. Nothing is admitted while a running
        # sequence waits for a block (as a scheduler does): a preempted request readmitted at
        # once took back the blocks its preemption freed, and small pools livelocked.
        while not stalled and pending and m.num_blocks - m.num_free_blocks + m.num_reserved_blocks < 0.9 * m.num_blocks:
            rid, toks, out_len = pending[0]
            hit = m.lookup_prefix(toks)
            if m.allocate_slots(
                rid, toks, len(toks) - hit.num_cached_tokens, hit,
                expected_num_tokens=len(toks) + out_len,
            ) is None:
                break
            m.commit(rid, toks, len(toks))
            running.append(_Seq(rid, list(toks), out_len, toks, out_len))
            pending.pop(0)
        still: list[_Seq] = []
        progressed = stalled = False
        for seq in running:
            seq.tokens.append(rng.randrange(50_000))
            if m.allocate_slots(seq.rid, seq.tokens, 1) is None:
                seq.tokens.pop()  # pool full: this sequence waits a step
                still.append(seq)
                stalled = True
                continue
            m.commit(seq.rid, seq.tokens, len(seq.tokens))
            progressed = True
            seq.remaining -= 1
            if seq.remaining == 0:
                runs_ok += m.num_runs(seq.rid) <= 2
                finished += 1
                m.free(seq.rid)
            else:
                still.append(seq)
        running = still
        if running and not progressed:  # every sequence is stuck: preempt the youngest
            victim = running.pop()
            m.free(victim.rid)
            pending.insert(0, (victim.rid + "r", victim.prompt, victim.out_len))
            preempted += 1
        if between_steps is not None:
            between_steps(m)
        s = m.stats()
        util.append(s.utilization)
        ext.append(s.external_fragmentation)
        ftot.append(s.f_total)
        occ.append(s.usage)
        committed.append(s.usage + s.num_reserved_blocks / s.num_blocks)
    s = m.stats()
    return {
        "utilization_time_avg": statistics.fmean(util),
        "external_fragmentation_avg": statistics.fmean(ext),
        "f_total_avg": statistics.fmean(ftot),
        "occupancy_avg": statistics.fmean(occ),
        "committed_avg": statistics.fmean(committed),
        "seqs_in_le2_runs": runs_ok / max(1, finished),
        "prefix_hit_ratio": s.prefix_hit_ratio,
        "num_steps": len(util),
        "num_preempted": preempted,
    }


def bench_replay(num_blocks: int, num_requests: int, seeds: int) -> list[dict[str, Any]]:
    rows = []
    for allocator in ("best_fit", "first_free"):
        for eviction in ("lru", "adaptive"):
            per_seed = [replay(allocator, eviction, num_blocks, num_requests, s) for s in range(seeds)]
            row: dict[str, Any] = {"allocator": allocator, "eviction": eviction}
            for key in per_seed[0]:
                row[key] = statistics.median(r[key] for r in per_seed)
            rows.append(row)
            print(f"  replay done: {allocator}/{eviction}", file=sys.stderr)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(fmt(r[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,65536,1048576")
    ap.add_argument("--ops", type=int, default=3000, help="churn ops per size and seed")
    ap.add_argument("--lookup-reps", type=int, default=200)
    ap.add_argument("--replay-blocks", type=int, default=4096)
    ap.add_argument("--replay-requests", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    costs = bench_costs(sizes, args.ops, args.lookup_reps)
    replays = bench_replay(args.replay_blocks, args.replay_requests, args.seeds)
    print("## Cost per block (ns, median of 3 seeds)\n" + _table(costs))
    print("\n## Chat-like replay (median over seeds)\n" + _table(replays))
    result = {"block_size": BS, "costs": costs, "replay": replays, "args": vars(args) | {"json": str(args.json)}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
