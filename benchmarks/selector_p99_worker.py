"""One side of ``selector_p99.py``'s A/B: a SelectorCore over the selector_bench fleet, driven
over stdin/stdout (one JSON object a line), importing ``cluster`` from the tree it is given.

    python benchmarks/selector_p99_worker.py TREE REPLICAS BLOCKS COPIES SEED

Prints ``{"ready": ...}`` once the index is populated, then answers each command line:

- ``{"op": "run", "start": i, "n": n, "rate": r}``: ``core.select`` on prompts ``i..i+n``
  (every prompt once: fresh blocks), paced at ``r`` per second (0: back to back); answers
  the wall and thread-CPU seconds of each call.
- ``{"op": "replay", "start": i, "n": n, "rate": 0}``: ``n`` Selects of prompt ``i`` without
  speculative inserts (no state changes: the same work again and again, warm in the
  caches): the machine's own noise on a fixed workload.
- ``{"op": "quit"}``.

NOTE: only ``cluster`` and ``benchmarks.selector_fixture`` come from TREE (both exist in
the baseline commits it is compared with), so one worker file drives every tree.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any


def main(argv: list[str]) -> int:
    tree, replicas, blocks, copies, seed = argv[0], *(int(x) for x in argv[1:5])
    sys.path.insert(0, tree)
    import numpy as np

    from benchmarks.selector_fixture import BLOCK_SIZE, CHAIN_BLOCKS, _populate, prompts
    from cluster.selector.core import CoreConfig, SelectorCore
    from cluster.selector.types import SelectionRequest

    core = SelectorCore(CoreConfig(stale_after_s=1e9))
    num_chains = _populate(core, replicas, blocks, copies)
    gc.collect()
    gc.freeze()  # NOTE: as the service does after start-up (and selector_bench's fixture)
    cache: dict[int, Any] = {}

    def prompt(i: int) -> Any:
        # NOTE: made in batches outside the timed calls; uint64 arrays as the wire codec gives
        if i not in cache:
            base = i - i % 1000
            cache.clear()
            for j, p in enumerate(prompts(1000, num_chains, seed * 1_000_003 + base)):
                cache[base + j] = np.asarray(p, np.int64).view(np.uint64)
        return cache[i]

    import cluster

    print(json.dumps({"ready": True, "num_chains": num_chains, "cluster": cluster.__file__}),
          flush=True)  # fmt: skip
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        start, n, rate = int(cmd["start"]), int(cmd["n"]), float(cmd["rate"])
        replay = cmd["op"] == "replay"
        idx = [start] * n if replay else range(start, start + n)
        reqs = [SelectionRequest(f"q{i}", prompt(i), CHAIN_BLOCKS * BLOCK_SIZE) for i in idx]
        wall, cpu = [], []
        t_start = time.perf_counter()
        for k, req in enumerate(reqs):
            if rate > 0:
                while time.perf_counter() - t_start < k / rate:
                    pass
            t, c = time.perf_counter(), time.thread_time()
            core.select(req, max_results=4, speculative=not replay)
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
