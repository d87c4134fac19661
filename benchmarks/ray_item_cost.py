"""What one streamed output costs as a Ray streaming-generator item vs a Unix-socket frame.

Why it exists: the case for ``replicas/output_post.py`` (a streamed request's outputs from the
LLM replica to the ingress over a Unix socket). Plain Ray, no Serve: one async actor sends
``--items`` small dicts (an output's shape: request id, 8 token ids, a text delta) to this
process, (a) as items of a streaming generator the caller iterates, (b) as length-prefixed
pickles over a Unix socket the caller serves; alternated ``--rounds`` times. Per item: wall
time, and the CPU of the caller and of the actor process (psutil; the caller's includes Ray's
core-worker threads in it, which is where an item's round trip is spent).

    python benchmarks/ray_item_cost.py --json benchmarks/results/ray_item_cost_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import platform
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<I")
ITEM = {"request_id": "cmpl-0123456789abcdef", "new_token_ids": [1, 2, 3, 4, 5, 6, 7, 8],
        "text_delta": " hello world, foo bar", "finished": False}


class Sender:
    """The actor: the same outputs as generator items or as socket frames."""

    def pid(self) -> int:
        return os.getpid()

    async def stream(self, n: int) -> Any:
        for i in range(n):
            yield {**ITEM, "i": i}

    async def post(self, path: str, n: int) -> int:
        _, w = await asyncio.open_unix_connection(path)
        for i in range(n):
            body = pickle.dumps({**ITEM, "i": i}, protocol=5)
            w.write(struct.pack("<I", len(body)) + body)
            if w.transport.get_write_buffer_size() > 1 << 20:
                await w.drain()
        await w.drain()
        w.close()
        return n


def _cpu(proc: Any) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def run(items: int, rounds: int) -> dict[str, Any]:
    import psutil
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sender = ray.remote(Sender).remote()
        actor = psutil.Process(ray.get(sender.pid.remote()))
        me = psutil.Process()

        async def as_items() -> int:
            n = 0
            async for ref in sender.stream.remote(items):
                await ref
                n += 1
            return n

        async def as_frames() -> int:
            path = str(Path(tempfile.mkdtemp(prefix="ray-item-cost-")) / "s")
            got, done = [0], asyncio.Event()

            async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                try:
                    while True:
                        (size,) = HEADER.unpack(await r.readexactly(HEADER.size))
                        pickle.loads(await r.readexactly(size))
                        got[0] += 1
                except asyncio.IncompleteReadError:
                    done.set()

            server = await asyncio.start_unix_server(serve, path)
            await sender.post.remote(path, items)
            await done.wait()
            server.close()
            return got[0]

        rows: dict[str, list[dict[str, float]]] = {"ray_item": [], "socket_frame": []}
        for _ in range(rounds):
            for name, fn in (("ray_item", as_items), ("socket_frame", as_frames)):
                c0, a0, t0 = _cpu(me), _cpu(actor), time.perf_counter()
                n = asyncio.run(fn())
                wall = time.perf_counter() - t0
                assert n == items, (name, n)
                rows[name].append({"wall_us": 1e6 * wall / n,
                                   "caller_cpu_us": 1e6 * (_cpu(me) - c0) / n,
                                   "actor_cpu_us": 1e6 * (_cpu(actor) - a0) / n})
    finally:
        ray.shutdown()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for name, rs in rows.items()}
    return {"benchmark": "ray_item_cost", "items": items, "rounds": rounds,
            "machine": platform.node(), "cpu_count": os.cpu_count(), "runs": rows,
            "median": med}


def table(res: dict[str, Any]) -> str:
    lines = ["| path | wall us/item | caller CPU us/item | actor CPU us/item |",
             "|---|---:|---:|---:|"]
    for name, m in res["median"].items():
        lines.append(f"| {name} | {m['wall_us']:.0f} | {m['caller_cpu_us']:.0f} | "
                     f"{m['actor_cpu_us']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.items < 1 or args.rounds < 1:
        p.error("--items and --rounds must be >= 1")
    res = run(args.items, args.rounds)
    print(table(res))
    print(json.dumps(res["median"]))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
