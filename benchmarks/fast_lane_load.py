"""Closed-loop load on the Select fast lane (``cluster/selector/fast_lane.py``) from client
processes: each pipelines ``concurrency`` calls over ``connections`` connections on a uvloop
loop (asyncio's when uvloop is not installed). Used by ``selector_rpc.py`` (front end
``raw-wire``) and ``selector_bench.py`` (the fast lane's Select/s at the largest R).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def pipelined(address: str, method: str, msgs: list[Any], concurrency: int,
                    seconds: float, connections: int) -> float:  # fmt: skip
    """Calls/s of ``method`` ("Select" or "Ping") with ``concurrency`` calls in flight,
    spread over ``connections`` pipelined connections."""
    from cluster.selector.fast_lane_client import FastLaneClient
    from cluster.selector.fast_lane_frames import Kind

    kind = Kind.SELECT if method == "Select" else Kind.PING
    raw = [m.SerializeToString() for m in msgs]
    clients = [FastLaneClient(address) for _ in range(connections)]
    for c in clients:
        await c.call(kind, raw[0], 10)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        i, c = k, clients[k % connections]
        while time.perf_counter() < stop:
            await c.call(kind, raw[i % len(raw)], 10)
            done += 1
            i += concurrency

    t = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    rps = done / (time.perf_counter() - t)
    for c in clients:
        await c.close()
    return rps


def client_main(conn: Connection, address: str, method: str, msgs: list[Any],
                concurrency: int, seconds: float, connections: int) -> None:  # fmt: skip
    """A client process: waits for "go", answers its calls/s."""
    conn.recv()
    loop = new_loop()
    conn.send(loop.run_until_complete(
        pipelined(address, method, msgs, concurrency, seconds, connections)))  # fmt: skip
    loop.close()


def closed_loop(address: str, method: str, msgs: list[Any], concurrency: int, seconds: float,
                connections: int, client_procs: int, server_pid: int) -> dict[str, float]:  # fmt: skip
    """Summed calls/s of ``client_procs`` fast-lane client processes, and the server's CPU per
    call (and cores busy) over that window."""
    args = (address, method, msgs, concurrency, seconds, connections)
    return drive(client_main, args, client_procs, seconds, server_pid)


def drive(target: Callable[..., None], args: tuple[Any, ...], client_procs: int, seconds: float,
          server_pid: int) -> dict[str, float]:  # fmt: skip
    """Start ``client_procs`` processes of ``target(conn, *args)`` (each waits for "go", then
    answers its calls/s), release them together; summed calls/s and the server's CPU per call
    (and cores busy) over the window."""
    from benchmarks.selector_bench import _cpu_s

    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(client_procs):
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=target, args=(child, *args)))
        procs[-1].start()
        pipes.append(parent)
    time.sleep(1.0 + 0.5 * client_procs)  # NOTE: the clients' imports, outside the window
    s0, t0 = _cpu_s(server_pid), time.perf_counter()
    for parent in pipes:
        parent.send("go")
    rps = sum(float(parent.recv()) for parent in pipes)
    s1, wall = _cpu_s(server_pid), time.perf_counter() - t0
    for p in procs:
        p.join(30)
    return {"rps": rps, "server_cpu_us": (s1 - s0) / max(rps * seconds, 1) * 1e6,
            "server_cores": (s1 - s0) / wall}  # fmt: skip
