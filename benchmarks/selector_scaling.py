"""selector_bench's N-process scaling: N selection processes, each holding the full index
(what each replica of the service is), driven closed-loop by client processes spread over
them; Select/s and Ping/s per N, and the scaling factor against N x one process.

``--scaling-front lane``: the clients call the Select fast lane (``cluster/selector/fast_lane.py``,
what the router uses) instead of gRPC. ``--pin``: selection process k runs on CPU k, the
clients on the CPUs left (so N servers do not share cores with the clients driving them; needs
more CPUs than the largest N).

``--reuseport``: the N processes listen on ONE port (``grpc.so_reuseport``; the kernel
spreads connections), started one by one as N grows; each client then opens
``--client-channels`` connections so the kernel has several to spread (gRPC only)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from benchmarks.selector_bench import _throughput
from benchmarks.selector_fixture import BLOCK_SIZE, CHAIN_BLOCKS, _populate, _rss_mb, prompts


def pin_plan(num_servers: int, num_cpus: int) -> tuple[list[set[int]], set[int]]:
    """CPU sets for ``--pin``: server k on CPU k, the clients on every CPU after the servers'.
    ValueError when no CPU is left for the clients."""
    if num_servers >= num_cpus:
        raise ValueError(f"--pin needs more CPUs than selection processes ({num_servers} >= "
                         f"{num_cpus})")
    return [{k} for k in range(num_servers)], set(range(num_servers, num_cpus))


def _pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def _replica_server_main(
    conn: Connection, num_replicas: int, blocks_per_replica: int, copies: int, reuse_port: bool,
    lane: bool = False, cpus: set[int] | None = None,
) -> None:
    """One selection process holding the full index (what each replica of the service is);
    it listens on the port it is then sent (0: a free one), with a fast lane on a free port
    when ``lane``; it answers the address its clients call."""
    from cluster.selector.core import CoreConfig, SelectorCore
    from cluster.selector.server import ServerThread

    _pin(cpus)
    core = SelectorCore(CoreConfig(stale_after_s=1e9))
    num_chains = _populate(core, num_replicas, blocks_per_replica, copies)
    gc.collect()
    gc.freeze()
    conn.send({"num_chains": num_chains, "rss_mb": _rss_mb()})
    port = conn.recv()
    if port == "stop":  # NOTE: never asked to listen
        return
    server = ServerThread(core, port=port, reuse_port=reuse_port,
                          fast_lane_port=0 if lane else None).start()
    conn.send(server.fast_lane_address if lane else server.address)
    conn.recv()
    server.stop()


def _client_main(
    conn: Connection, address: str, method: str, num_chains: int, ns: argparse.Namespace, k: int,
    cpus: set[int] | None = None,
) -> None:
    from protos import cache_selection_pb2 as pb

    _pin(cpus)
    if method == "Ping":
        msgs: list[Any] = [pb.PingRequest()]
    else:
        msgs = [
            pb.SelectRequest(
                request_id=f"s{k}-{i}",
                block_hashes=h,
                num_prompt_tokens=CHAIN_BLOCKS * BLOCK_SIZE,
                max_results=4,
            )
            for i, h in enumerate(prompts(500, num_chains, ns.seed + 10 + k))
        ]
    conn.recv()  # start together
    if ns.scaling_front == "lane":
        from benchmarks.fast_lane_load import new_loop, pipelined

        loop = new_loop()
        conn.send(loop.run_until_complete(
            pipelined(address, method, msgs, ns.concurrency, ns.window_s, 2)))  # fmt: skip
        loop.close()
    elif ns.reuseport:
        conn.send(asyncio.run(_spread(address, method, msgs, ns)))
    else:
        conn.send(asyncio.run(_throughput(address, method, msgs, ns.concurrency, ns.window_s)))


async def _spread(address: str, method: str, msgs: list[Any], ns: argparse.Namespace) -> float:
    """``_throughput`` over ``ns.client_channels`` separate connections (their own subchannel
    pools), ``ns.concurrency`` calls in flight in all."""
    per = max(ns.concurrency // ns.client_channels, 1)
    opts = [("grpc.use_local_subchannel_pool", 1)]
    rates = await asyncio.gather(*(_throughput(address, method, msgs, per, ns.window_s, opts)
                                   for _ in range(ns.client_channels)))  # fmt: skip
    return float(sum(rates))


def _aggregate(
    addresses: list[str], method: str, num_chains: int, ns: argparse.Namespace, n: int,
    cpus: set[int] | None = None,
) -> float:
    """Closed-loop calls/s summed over client processes spread over ``addresses``."""
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    for k in range(max(ns.client_procs, n)):
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=_client_main,
            args=(child, addresses[k % len(addresses)], method, num_chains, ns, k, cpus),
        )
        p.start()
        procs.append(p)
        pipes.append(parent)
    for c in pipes:
        c.send("go")
    total = sum(float(c.recv()) for c in pipes)
    for p in procs:
        p.join(30)
    return total


def run_scaling(ns: argparse.Namespace) -> dict[str, Any]:
    """Select/s of N selection processes (each with the full index) at the largest R."""
    num_replicas = max(ns.replicas)
    lane = ns.scaling_front == "lane"
    server_cpus, client_cpus = (pin_plan(max(ns.procs), os.cpu_count() or 1) if ns.pin
                                else ([None] * max(ns.procs), None))
    ctx = mp.get_context("spawn")
    servers, pipes, infos = [], [], []
    try:
        for k in range(max(ns.procs)):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_replica_server_main,
                args=(child, num_replicas, ns.blocks_per_replica, ns.copies, ns.reuseport, lane,
                      server_cpus[k]),
            )
            p.start()
            servers.append(p)
            pipes.append(parent)
        infos = [c.recv() for c in pipes]
        listening: list[str] = []

        def listen(n: int) -> list[str]:
            """Addresses of the first n servers (with reuseport: one, n listening on it)."""
            while len(listening) < n:
                c = pipes[len(listening)]
                c.send(int(listening[0].rsplit(":", 1)[1]) if ns.reuseport and listening else 0)
                listening.append(c.recv())
            return listening[:1] if ns.reuseport else listening[:n]

        rows = []
        for n in ns.procs:
            pings, sels = [], []
            for _ in range(1 if ns.quick else ns.scale_rounds):
                for method, out in (("Ping", pings), ("Select", sels)):
                    out.append(_aggregate(listen(n), method, infos[0]["num_chains"], ns, n,
                                          client_cpus))
            rows.append(
                {
                    "num_procs": n,
                    "client_procs": max(ns.client_procs, n),
                    "select_rps": float(np.median(sels)),
                    "ping_rps": float(np.median(pings)),
                    "select_rounds": sels,
                    "ping_rounds": pings,
                }
            )
            print(
                f"  {n} selection process(es): {rows[-1]['select_rps']:.0f} Select/s, "
                f"{rows[-1]['ping_rps']:.0f} Ping/s",
                flush=True,
            )
        base = rows[0]["select_rps"] / rows[0]["num_procs"]
        for r in rows:
            r["scaling"] = r["select_rps"] / (base * r["num_procs"])
        return {
            "front": ns.scaling_front,
            "pinned": bool(ns.pin),
            "reuseport": ns.reuseport,
            "num_replicas": num_replicas,
            "rss_mb_per_proc": [i["rss_mb"] for i in infos],
            "rows": rows,
        }
    finally:
        for c in pipes:
            c.send("stop")
        for p in servers:
            p.join(60)
            if p.is_alive():
                p.terminate()
