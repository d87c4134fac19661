"""What a grpc.aio unary handler's latency pays for: the message sizes, the handler's own work,
and work scheduled after the answer (``loop.call_soon``), against an empty RPC on the same
server (the selection service's Select / Ping question, issue 19; benchmarks/README.md,
"Ninth pass").

    python benchmarks/grpc_after_answer.py [--work-us 30] [--rounds 20] [--json OUT.json]

Methods, raw bytes both ways (no protobuf): ``Ping`` (empty in, empty out), ``Echo`` (a
Select-sized 1,200-byte request, a 500-byte answer), ``Work`` (Echo plus ``--work-us`` of
busy CPU before answering), ``After`` (Echo, the same busy CPU in a callback the handler
schedules with ``call_soon``). Sequential calls from one synchronous client in rounds of 100
per method, interleaved; prints p50 per method and its ratio to Ping.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time
from typing import Any

REQUEST, ANSWER = bytes(1200), bytes(500)
METHODS = ("Ping", "Echo", "Work", "After")


def _busy(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def _serve(ports: Any, work_us: float) -> None:
    import grpc

    async def main() -> None:
        server = grpc.aio.server()

        async def ping(raw: bytes, ctx: Any) -> bytes:
            return b""

        async def echo(raw: bytes, ctx: Any) -> bytes:
            return ANSWER

        async def work(raw: bytes, ctx: Any) -> bytes:
            _busy(work_us)
            return ANSWER

        async def after(raw: bytes, ctx: Any) -> bytes:
            asyncio.get_running_loop().call_soon(_busy, work_us)
            return ANSWER

        def same(b: bytes) -> bytes:
            return b

        fns = dict(zip(METHODS, (ping, echo, work, after), strict=True))
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=same, response_serializer=same
            )
            for name, fn in fns.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("b", handlers),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def run(work_us: float, rounds: int) -> dict[str, Any]:
    import grpc

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(ports, work_us), daemon=True)
    proc.start()
    try:
        port = ports.get(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            calls = {m: ch.unary_unary(f"/b/{m}", lambda b: b, lambda b: b) for m in METHODS}
            msg = {m: b"" if m == "Ping" else REQUEST for m in METHODS}
            samples: dict[str, list[float]] = {m: [] for m in METHODS}
            for _ in range(200):  # NOTE: warm-up, and each method answers what it should
                for m in METHODS:
                    if calls[m](msg[m], timeout=10) != (b"" if m == "Ping" else ANSWER):
                        raise RuntimeError(f"{m} answered the wrong bytes")
            for _ in range(rounds):
                for m in METHODS:
                    for _ in range(100):
                        t = time.perf_counter()
                        calls[m](msg[m], timeout=10)
                        samples[m].append(time.perf_counter() - t)
    finally:
        proc.kill()
    p50 = {m: statistics.median(v) * 1e6 for m, v in samples.items()}
    return {
        "work_us": work_us,
        "calls_per_method": rounds * 100,
        "p50_us": p50,
        "over_ping": {m: p50[m] / p50["Ping"] for m in METHODS},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-us", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", default="")
    ns = p.parse_args(argv)
    out = run(ns.work_us, ns.rounds)
    print(json.dumps(out, indent=1))
    print("\n| method | p50 us | / Ping |\n|---|---:|---:|")
    for m in METHODS:
        print(f"| {m} | {out['p50_us'][m]:.0f} | {out['over_ping'][m]:.3f} |")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
