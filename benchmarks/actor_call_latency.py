"""Plain Ray's share of Serve's handle hop: how long a Ray actor call takes from the caller's
send to the method's entry (an async actor on this machine, a 1,024-int argument like a
prompt's token ids), streaming (as Serve's handle calls a replica) and plain, alternated.

    python benchmarks/actor_call_latency.py --requests 200 --json /tmp/actor_call_latency.json

Prints a table and the JSON: p50 / p90 ms of each kind and streaming / plain. Set beside the
served app's ``router_select`` hop (``serve_overhead.py``) it says how much of that hop is Ray
and how much is Serve (``results/serve_overhead_notes.md``, session 16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any


def _pcts(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50_ms": statistics.median(xs), "p90_ms": xs[int(0.9 * (len(xs) - 1))]}


async def measure(actor: Any, requests: int, warmup: int = 20) -> dict[str, dict[str, float]]:
    """Send -> entry ms of ``requests`` streaming and plain calls, alternated, after warm-up."""
    payload = list(range(1024))
    streaming: list[float] = []
    plain: list[float] = []
    for i in range(warmup + requests):
        async for ref in actor.entered_stream.options(num_returns="streaming").remote(
                time.time(), payload):
            s = await ref
        p = await actor.entered.remote(time.time(), payload)
        if i >= warmup:
            streaming.append(s * 1e3)
            plain.append(p * 1e3)
        await asyncio.sleep(0.005)  # NOTE: an idle actor between calls, as at concurrency 1
    return {"streaming": _pcts(streaming), "plain": _pcts(plain)}


def run(requests: int) -> dict[str, Any]:
    """Start a local Ray, measure, shut it down; the result as ``main`` writes it."""
    import ray

    @ray.remote
    class Entry:
        async def entered(self, sent: float, payload: list[int]) -> float:
            return time.time() - sent

        async def entered_stream(self, sent: float, payload: list[int]) -> Any:
            yield time.time() - sent

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        res = asyncio.run(measure(Entry.remote(), requests))  # type: ignore[attr-defined]
    finally:
        ray.shutdown()
    return {"benchmark": "actor_call_latency", "machine": platform.node(), "requests": requests,
            **res, "streaming_over_plain_p50": res["streaming"]["p50_ms"] / res["plain"]["p50_ms"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    out = run(ns.requests)
    print(f"{'call':>10} {'p50 ms':>8} {'p90 ms':>8}")
    for kind in ("plain", "streaming"):
        print(f"{kind:>10} {out[kind]['p50_ms']:>8.3f} {out[kind]['p90_ms']:>8.3f}")
    print(f"streaming / plain p50: {out['streaming_over_plain_p50']:.2f}")
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {ns.json}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
