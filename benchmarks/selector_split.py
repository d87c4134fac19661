"""Where one Select's compute goes, at the selector_bench fleet (R replicas x blocks).

One process, one core, fresh prompts (every block of a prompt's unshared suffix new):

1. ``live``: ``core.select`` back to back, timing the whole call and, inside it, the one
   compiled call (``select_kernel.select_bound``, around ``rank_and_route``); the Python
   around it is the difference.
2. Parts of the compiled call, each on its own fresh prompts against the tables as the live
   pass left them (read-only, so nothing changes between parts): the index walk alone
   (``walk_kernel.walk``), and the ranking (``select_kernel.rank``: walk, hotness, gather,
   score, top-k). What ``rank_and_route`` adds to ``rank`` is the expiry and the winner's
   route (pending marks, queue, access bump).
3. The walk by shared-prefix length (it is the part that grows with the prompt's match).

Thread CPU time per call (the machine is shared; wall time adds the time descheduled).

    python benchmarks/selector_split.py --json benchmarks/results/selector_split.json
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.selector_fixture import BLOCK_SIZE, CHAIN_BLOCKS, _populate, prompts


def _pcts(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e6
    return {"p50_us": float(np.percentile(a, 50)), "p90_us": float(np.percentile(a, 90)),
            "p99_us": float(np.percentile(a, 99)), "mean_us": float(a.mean())}  # fmt: skip


def _prompts(num: int, num_chains: int, seed: int) -> tuple[list[Any], np.ndarray]:
    """uint64 prompts and their shared-prefix lengths (the fixture's draw, repeated)."""
    rng = np.random.default_rng(seed)
    rng.integers(0, num_chains, num)
    shared = rng.integers(0, CHAIN_BLOCKS + 1, num)
    ps = [np.asarray(p, np.int64).view(np.uint64) for p in prompts(num, num_chains, seed)]
    return ps, shared


def _params(kernel: Any) -> list[str]:
    """A compiled function's parameter names, in order."""
    return list(inspect.signature(kernel.py_func).parameters)


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from cluster.selector import index_kernels, select_kernel, walk_kernel
    from cluster.selector.core import CoreConfig, SelectorCore
    from cluster.selector.types import SelectionRequest

    core = SelectorCore(CoreConfig(stale_after_s=1e9))
    num_chains = _populate(core, ns.replicas, ns.blocks_per_replica, ns.copies)
    gc.collect()
    gc.freeze()
    n = ns.num_requests
    ps, _ = _prompts(n, num_chains, ns.seed)
    captured: list[tuple[Any, ...]] = []
    kernel_cpu: list[float] = []
    # NOTE: ``select_bound`` is what the ranker calls from Python (its callees are compiled in)
    inner = select_kernel.select_bound

    def timed(*args: Any) -> int:
        c = time.thread_time()
        r: int = inner(*args)
        kernel_cpu.append(time.thread_time() - c)
        captured.append(args)
        return r

    select_kernel.select_bound = timed
    total: list[float] = []
    try:
        for i, h in enumerate(ps):
            req = SelectionRequest(f"s{i}", h, CHAIN_BLOCKS * BLOCK_SIZE)
            c = time.thread_time()
            core.select(req, max_results=4)
            total.append(time.thread_time() - c)
    finally:
        select_kernel.select_bound = inner
    python = [t - k for t, k in zip(total, kernel_cpu, strict=True)]
    # NOTE: the tables as the live pass left them: the last call's arguments by name, so
    # walk and rank get theirs whatever order each function takes them in
    last = dict(zip(_params(inner), captured[-1], strict=True))
    last["req"] = np.array([len(last["hashes"]), last["num_prompt_tokens"],
                            last["num_output_tokens"], float(last["origin"] != -1)])  # fmt: skip
    match = last["match"]
    walk_args = tuple(last[n] for n in _params(walk_kernel.walk)[1:-4])
    tables = tuple(last[n] for n in _params(select_kernel.rank)[1:])
    parts: dict[str, list[float]] = {"walk": [], "rank": []}
    walk_by_shared: dict[int, list[float]] = {}
    fresh_w, shared_w = _prompts(n, num_chains, ns.seed + 1)
    fresh_r, _ = _prompts(n, num_chains, ns.seed + 2)
    for h, sh in zip(fresh_w, shared_w.tolist(), strict=True):
        match[:] = 0
        c = time.thread_time()
        walk_kernel.walk(h, *walk_args, match[0], match[1], match[2], index_kernels.SINK)
        d = time.thread_time() - c
        parts["walk"].append(d)
        walk_by_shared.setdefault(min(sh // 32, 3), []).append(d)
    for h in fresh_r:
        c = time.thread_time()
        select_kernel.rank(h, *tables)
        parts["rank"].append(time.thread_time() - c)
    live = {"select": total, "compiled_call": kernel_cpu, "python_around": python}
    by_shared = {f"{32 * b}-{32 * b + 31 + (b == 3)}": v for b, v in sorted(walk_by_shared.items())}
    return {
        "live": {k: _pcts(v) for k, v in live.items()},
        "parts": {k: _pcts(v) for k, v in parts.items()},
        "walk_by_shared_blocks": {k: _pcts(v) for k, v in by_shared.items()},
    }


def _table(res: dict[str, Any]) -> str:
    lines = [f"{'part (thread CPU)':<34} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}  us"]
    rows = [(f"live: {k}", v) for k, v in res["live"].items()]
    rows += [(f"alone: {k}", v) for k, v in res["parts"].items()]
    rows += [(f"walk, shared {k} blocks", v) for k, v in res["walk_by_shared_blocks"].items()]
    for name, v in rows:
        lines.append(f"{name:<34} {v['p50_us']:>7.1f} {v['p90_us']:>7.1f} {v['p99_us']:>7.1f} "
                     f"{v['mean_us']:>7.1f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--replicas", type=int, default=256)
    p.add_argument("--blocks-per-replica", type=int, default=100_000)
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=3000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args(argv)
    load0 = os.getloadavg()
    res = run(ns)
    load1 = os.getloadavg()
    print(_table(res))
    print(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} ({os.cpu_count()} CPUs)")
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"argv": sys.argv[1:], "load_before": load0, "load_after": load1, **res}
        ns.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
