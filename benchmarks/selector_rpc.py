"""The selection service's gRPC front ends side by side, in one run, on one server process
that holds one core (R replicas x blocks, the selector_bench fixture):

- ``aio-proto``: grpc.aio, Select through protobuf objects (``select_codec="proto"``)
- ``aio-wire``: grpc.aio, Select as bytes (``cluster/selector/wire.py``; the default)
- ``uvloop-wire``: the same on a uvloop event loop (if uvloop is installed)
- ``sync-wire``: grpc's synchronous server (thread pool), generic bytes handlers; its
  Select handler's own thread CPU is timed too (decode + core + encode: ``handler``)
- ``raw-wire``: no gRPC: the Select fast lane (``cluster/selector/fast_lane.py``, length-
  prefixed frames over one TCP connection, the same wire bytes) on its own uvloop thread;
  its closed loop pipelines ``--concurrency`` calls over ``--raw-connections`` connections
  per client process, its sequential figures come from a blocking socket
- ``raw-asyncio``: the same fast lane on an asyncio (not uvloop) loop thread
- ``raw-on-aio``: the product's arrangement: the lane on the aio gRPC server's own loop
  (``ServerThread(fast_lane_port=0)``); its gRPC port serves nothing in the run

Per front end: sequential Ping and Select latency (interleaved rounds of 100), closed-loop
calls/s with ``--concurrency`` in flight from a client process, and the server process's CPU
per call in that window (what bounds one process's rate: ``1e6/cpu`` = Selects/s one core
could serve at that CPU per call). Quote the ratios.

    python benchmarks/selector_rpc.py --replicas 256 --json benchmarks/results/selector_rpc_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import threading
import time
from concurrent import futures
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fast_lane_load import drive, new_loop, pipelined
from benchmarks.selector_bench import _latency, _throughput
from benchmarks.selector_fixture import (
    BLOCK_SIZE,
    CHAIN_BLOCKS,
    _pcts,
    _populate,
    prompts,
    recv_from,
)

FRONT_ENDS = ("aio-proto", "aio-wire", "uvloop-wire", "sync-wire", "raw-wire", "raw-asyncio",
              "raw-on-aio")
# NOTE: the sync server once per --sync-workers value: "sync-wire" for the first, then
# "sync-wire-w<N>" (thread-pool size changes GIL and lock hand-offs per call)


# thread CPU seconds inside the sync servers' Select handler (decode + core + encode), per call
HANDLER_CPU: list[float] = []


def _sync_server(core: Any, workers: int) -> tuple[Any, int]:
    """grpc's thread-pool server: Select (wire bytes) and Ping, generic handlers."""
    import grpc

    from cluster.selector.server import SERVICE_NAME
    from cluster.selector.wire import decode_select, encode_select
    from protos import cache_selection_pb2 as pb

    empty = pb.PingResponse().SerializeToString()

    def select(raw: bytes, context: Any) -> bytes:
        c = time.thread_time()
        req, cands, policy, k, spec = decode_select(raw, core.config.max_prompt_blocks)
        out = encode_select(core.select(req, cands, policy, k, spec))
        HANDLER_CPU.append(time.thread_time() - c)
        return out

    handlers = {
        "Select": grpc.unary_unary_rpc_method_handler(select),
        "Ping": grpc.unary_unary_rpc_method_handler(lambda raw, ctx: empty),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.so_reuseport", 0)])  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _uvloop_server(core: Any) -> tuple[Any, int] | None:
    try:
        import uvloop
    except ImportError:
        return None
    from cluster.selector.server import start_server

    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, name="uvloop-server", daemon=True).start()
    running = asyncio.run_coroutine_threadsafe(start_server(core), loop).result(60)
    return (loop, running), running.port


def _raw_server(core: Any, uv: bool = True) -> int:
    """The fast lane on its own loop thread (uvloop when installed and ``uv``); returns its
    port."""
    from cluster.selector.fast_lane import start_fast_lane

    loop = new_loop() if uv else asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="fast-lane", daemon=True).start()
    lane = asyncio.run_coroutine_threadsafe(start_fast_lane(core), loop).result(60)
    return lane.port


def _server_main(conn: Connection, num_replicas: int, blocks: int, copies: int,
                 workers: list[int], front_ends: list[str]) -> None:  # fmt: skip
    """One process, one core, every front end on its own port."""
    import gc

    from cluster.selector.core import CoreConfig, SelectorCore
    from cluster.selector.server import ServerThread

    core = SelectorCore(CoreConfig(stale_after_s=1e9))
    num_chains = _populate(core, num_replicas, blocks, copies)
    gc.collect()
    gc.freeze()
    ports: dict[str, int] = {}
    threads = []
    for codec in ("proto", "wire"):
        if f"aio-{codec}" in front_ends:
            threads.append(ServerThread(core, select_codec=codec).start())
            ports[f"aio-{codec}"] = threads[-1].port
    uv = _uvloop_server(core) if "uvloop-wire" in front_ends else None
    if uv is not None:
        ports["uvloop-wire"] = uv[1]
    if "raw-wire" in front_ends:
        ports["raw-wire"] = _raw_server(core)
    if "raw-asyncio" in front_ends:
        ports["raw-asyncio"] = _raw_server(core, uv=False)
    if "raw-on-aio" in front_ends:
        threads.append(ServerThread(core, fast_lane_port=0).start())
        lane = threads[-1].fast_lane_address
        assert lane is not None
        ports["raw-on-aio"] = int(lane.rpartition(":")[2])
    syncs = []
    for i, w in enumerate(workers if "sync-wire" in front_ends else []):
        server, port = _sync_server(core, w)
        syncs.append(server)
        ports["sync-wire" if i == 0 else f"sync-wire-w{w}"] = port
    conn.send({"ports": ports, "num_chains": num_chains})
    while conn.recv() == "handler":  # until "stop"
        conn.send(_pcts(HANDLER_CPU) if HANDLER_CPU else None)
        HANDLER_CPU.clear()
    for t in threads:
        t.stop()
    for server in syncs:
        server.stop(0)


def _client_main(conn: Connection, address: str, method: str, msgs: list[Any],
                 concurrency: int, seconds: float, raw_connections: int) -> None:  # fmt: skip
    conn.recv()
    if raw_connections:
        loop = new_loop()
        conn.send(loop.run_until_complete(
            pipelined(address, method, msgs, concurrency, seconds, raw_connections)))  # fmt: skip
        loop.close()
    else:
        conn.send(asyncio.run(_throughput(address, method, msgs, concurrency, seconds)))


def _closed_loop(address: str, method: str, msgs: list[Any], ns: argparse.Namespace,
                 server_pid: int, raw: bool = False) -> dict[str, float]:  # fmt: skip
    """Calls/s from ``--client-procs`` client processes (summed), and the server's CPU per
    call over that window."""
    args = (address, method, msgs, ns.concurrency, ns.window_s, ns.raw_connections if raw else 0)
    return drive(_client_main, args, ns.client_procs, ns.window_s, server_pid)


class _RawStub:
    """Sequential fast lane calls on a blocking socket, shaped like a sync gRPC stub's
    ``Ping`` / ``Select`` (the benchmark's own client: no event loop in the timed call)."""

    def __init__(self, address: str) -> None:
        import socket

        host, _, port = address.rpartition(":")
        self._sock = socket.create_connection((host, int(port)))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._call(1, b"")  # HELLO, no token

    def _call(self, kind: int, payload: bytes) -> bytes:
        from cluster.selector.fast_lane_frames import HEADER, frame

        self._sock.sendall(frame(7, kind, payload))
        head = self._recv(HEADER.size)
        length, _, got = HEADER.unpack(head)
        body = self._recv(length)
        assert got == 0, body
        return body

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self._sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("fast lane closed")
            out += chunk
        return out

    def Ping(self, msg: Any, timeout: float = 0) -> bytes:
        return self._call(3, b"")

    def Select(self, msg: Any, timeout: float = 0) -> bytes:
        return self._call(2, msg.SerializeToString())

    def __enter__(self) -> _RawStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def run(ns: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_server_main, args=(child, ns.replicas, ns.blocks_per_replica,
                                                  ns.copies, ns.sync_workers, ns.front_ends))  # fmt: skip
    proc.start()
    assert proc.pid is not None
    out: dict[str, Any] = {}
    try:
        info = recv_from(parent, proc)
        sel = [pb.SelectRequest(request_id=f"r{i}", block_hashes=h, max_results=4,
                                num_prompt_tokens=CHAIN_BLOCKS * BLOCK_SIZE)
               for i, h in enumerate(prompts(ns.num_requests, info["num_chains"], ns.seed))]  # fmt: skip
        ping = pb.PingRequest()
        for name in info["ports"]:
            address = f"127.0.0.1:{info['ports'][name]}"
            raw = name.startswith("raw-")
            with (_RawStub(address) if raw else grpc.insecure_channel(address)) as ch:
                stub = ch if raw else pb_grpc.CacheSelectionStub(ch)
                for _ in range(50):
                    stub.Ping(ping, timeout=10)
                    stub.Select(sel[0], timeout=10)
                ping_t: list[float] = []
                sel_t: list[float] = []
                for k in range(0, ns.num_requests, 100):
                    m = min(100, ns.num_requests - k)
                    ping_t += _latency(stub.Ping, lambda i: ping, m)
                    sel_t += _latency(stub.Select, lambda i, k=k: sel[k + i], m)
            parent.send("handler")
            recv_from(parent, proc)  # NOTE: drops the latency phase's samples
            rounds = [(_closed_loop(address, "Ping", [ping], ns, proc.pid, raw),
                       _closed_loop(address, "Select", sel, ns, proc.pid, raw))
                      for _ in range(ns.rounds)]  # fmt: skip
            parent.send("handler")
            handler = recv_from(parent, proc)
            med = {f"{m}_{key}": float(np.median([r[i][key] for r in rounds]))
                   for i, m in enumerate(("ping", "select")) for key in rounds[0][0]}  # fmt: skip
            p, s = _pcts(ping_t), _pcts(sel_t)
            out[name] = {"ping": p, "select": s, "select_over_ping_p50": s["p50_us"] / p["p50_us"],
                         **med, "rounds": rounds, "handler_cpu_closed_loop": handler}  # fmt: skip
            # NOTE: the bound: one core spends server_cpu_us per Select, whatever the front end
            out[name]["select_per_core_bound"] = 1e6 / med["select_server_cpu_us"]
            print(_row(name, out[name]), flush=True)
        parent.send("stop")
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
    return out


HEAD = (f"{'front end':<12} {'ping p50 us':>11} {'select p50/p99 us':>17} {'sel/ping':>8} "
        f"{'ping/s':>7} {'select/s':>8} {'srv cpu us: ping':>16} {'select':>7} {'handler':>7} "
        f"{'1e6/cpu':>7}")  # fmt: skip


def _row(name: str, r: dict[str, Any]) -> str:
    h = r["handler_cpu_closed_loop"]
    return (f"{name:<12} {r['ping']['p50_us']:>11.0f} "
            f"{r['select']['p50_us']:>8.0f}/{r['select']['p99_us']:<8.0f} "
            f"{r['select_over_ping_p50']:>8.2f} {r['ping_rps']:>7.0f} {r['select_rps']:>8.0f} "
            f"{r['ping_server_cpu_us']:>16.0f} {r['select_server_cpu_us']:>7.0f} "
            f"{h['mean_us'] if h else float('nan'):>7.0f} {r['select_per_core_bound']:>7.0f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--replicas", type=int, default=256)
    p.add_argument("--blocks-per-replica", type=int, default=100_000)
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="closed-loop windows per call kind")
    p.add_argument("--client-procs", type=int, default=1,
                   help="client processes of each closed-loop window (their calls/s summed)")
    p.add_argument("--raw-connections", type=int, default=2,
                   help="raw-wire: pipelined connections per client process")
    p.add_argument("--window-s", type=float, default=1.0)
    p.add_argument("--sync-workers", type=int, nargs="+", default=[4],
                   help="thread-pool sizes of the sync server (one server each)")
    p.add_argument("--front-ends", nargs="+", default=list(FRONT_ENDS), choices=FRONT_ENDS)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args(argv)
    print(HEAD)
    print("-" * len(HEAD))
    res = run(ns)
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({"argv": sys.argv[1:], "results": res}, indent=2))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
