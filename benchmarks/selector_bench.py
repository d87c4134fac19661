"""Cache-selection service benchmark: Select vs an empty RPC on the same loopback server.

For each replica count R (default 8, 64, 256), a server process holds R replicas with
``--blocks-per-replica`` resident blocks each (default 100k), laid out as 128-block chains
(2048-token prompts at block_size 16), every chain resident on ``--copies`` replicas. Prompts
share a random-length prefix (0..128 blocks) with one chain and continue with fresh blocks.

Measured per R, in one run (ratios are what to quote; this machine is shared and noisy):

- gRPC latency p50/p99, sequential: Ping (empty RPC, the floor) and Select (max_results=4).
- throughput with ``--concurrency`` calls in flight (grpc.aio client): Ping vs Select, req/s.
- service-side compute per Select, measured inside the server process: core only, and core +
  proto decode/encode (what the servicer adds), p50/p99.
- event ingestion: BlockStored/BlockRemoved batches applied by the core (in-process, one core)
  and streamed over ReportKV (wire), block events/s.
- at the largest R, the same server's Select over its fast lane (``cluster/selector/fast_lane.py``,
  no gRPC): closed-loop Select/s from ``--fast-lane-client-procs`` client processes, each
  pipelining ``--concurrency`` calls, and the server's CPU per Select (issue figure
  ``select_rps_fast_lane``).

    python benchmarks/selector_bench.py --json results/selector.json
    python benchmarks/selector_bench.py --replicas 8 64 --blocks-per-replica 20000 --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.selector_fixture import (
    BLOCK_SIZE,
    CHAIN_BLOCKS,
    _pcts,
    _server_main,
    prompts,
    recv_from,
)
from benchmarks.selector_report import cpu_table, figures_table, issue_figures, table

STEADY_S = 3.0  # the server's pending_ttl_s (2 s, CoreConfig's default) + 1 s

# ------------------------------------------------------------------------------ client side
def _latency(stub: Any, make: Any, n: int) -> list[float]:
    out = []
    for i in range(n):
        msg = make(i)
        t = time.perf_counter()
        stub(msg, timeout=10)
        out.append(time.perf_counter() - t)
    return out


async def _throughput(
    address: str, method: str, msgs: list[Any], concurrency: int, seconds: float,
    options: list[tuple[str, Any]] | None = None,
) -> float:  # fmt: skip
    import grpc

    from protos import cache_selection_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address, options=options) as ch:
        call = getattr(pb_grpc.CacheSelectionStub(ch), method)
        await call(msgs[0], timeout=10)
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < stop:
                await call(msgs[i % len(msgs)], timeout=10)
                done += 1
                i += concurrency

        t = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.perf_counter() - t)


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of this process or of ``pid``."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_throughput(
    address: str, method: str, msgs: list[Any], ns: argparse.Namespace, server_pid: int
) -> dict[str, float]:
    """One closed-loop window, with the CPU each side spent per call: what bounds the rate
    (the client runs in this process; the server is ``server_pid``)."""
    c0, s0, t0 = _cpu_s(), _cpu_s(server_pid), time.perf_counter()
    rps = asyncio.run(_throughput(address, method, msgs, ns.concurrency, ns.window_s))
    calls = rps * ns.window_s
    wall = time.perf_counter() - t0
    return {
        "rps": rps,
        "client_cpu_us": (_cpu_s() - c0) / calls * 1e6,
        "server_cpu_us": (_cpu_s(server_pid) - s0) / calls * 1e6,
        "server_cores": (_cpu_s(server_pid) - s0) / wall,
        "client_cores": (_cpu_s() - c0) / wall,
    }


def _wire_ingest(address: str, num_batches: int, seed: int) -> float:
    import grpc

    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    hashes = [rng.integers(1 << 62, 1 << 63, 64).tolist() for _ in range(num_batches)]
    msgs = [pb.ReportKVRequest(replica_id="wire", hello=pb.ReplicaHello(block_size=BLOCK_SIZE))]
    for seq, h in enumerate(hashes):
        ev = pb.KVEvent(block_stored=pb.BlockStored(block_hashes=h, block_size=BLOCK_SIZE))
        msgs.append(pb.ReportKVRequest(batch=pb.KVEventBatch(seq=seq, events=[ev])))
    for seq, h in enumerate(hashes, start=num_batches):
        ev = pb.KVEvent(block_removed=pb.BlockRemoved(block_hashes=h))
        msgs.append(pb.ReportKVRequest(batch=pb.KVEventBatch(seq=seq, events=[ev])))
    msgs.append(pb.ReportKVRequest(goodbye=True))
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.CacheSelectionStub(ch)
        t = time.perf_counter()
        resp = stub.ReportKV(iter(msgs), timeout=120)
        elapsed = time.perf_counter() - t
    assert not resp.resync_required and resp.last_applied_seq == 2 * num_batches - 1, resp
    return 2 * 64 * num_batches / elapsed


def _fast_lane(
    address: str, msgs: list[Any], ns: argparse.Namespace, server_pid: int
) -> dict[str, Any]:
    """Closed-loop Select over the fast lane, median over the rounds."""
    from benchmarks.fast_lane_load import closed_loop

    procs = ns.fast_lane_client_procs
    rounds = [
        closed_loop(address, "Select", msgs, ns.concurrency, ns.window_s, 2, procs, server_pid)
        for _ in range(2 if ns.quick else ns.scale_rounds)
    ]
    return {
        "select_rps": float(np.median([r["rps"] for r in rounds])),
        "server_cpu_us": float(np.median([r["server_cpu_us"] for r in rounds])),
        "server_cores": float(np.median([r["server_cores"] for r in rounds])),
        "client_procs": ns.fast_lane_client_procs,
        "rounds": rounds,
    }


def run_one(num_replicas: int, ns: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_server_main,
        args=(child, num_replicas, ns.blocks_per_replica, ns.copies, ns.seed, ns.quick),
    )
    proc.start()
    try:
        info: dict[str, Any] = recv_from(parent, proc)
        address = f"127.0.0.1:{info['port']}"
        n = 300 if ns.quick else ns.num_requests
        ps = prompts(n, info["num_chains"], ns.seed + 3)
        sel_msgs = [
            pb.SelectRequest(
                request_id=f"r{i}",
                block_hashes=h,
                num_prompt_tokens=CHAIN_BLOCKS * BLOCK_SIZE,
                max_results=4,
            )
            for i, h in enumerate(ps)
        ]
        steady = [pb.SelectRequest(request_id=f"w{i}", block_hashes=h,
                                   num_prompt_tokens=CHAIN_BLOCKS * BLOCK_SIZE, max_results=4)
                  for i, h in enumerate(prompts(500, info["num_chains"], ns.seed + 4))]  # fmt: skip
        ping = pb.PingRequest()
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.CacheSelectionStub(ch)
            for _ in range(50):  # warm-up
                stub.Ping(ping, timeout=10)
                stub.Select(sel_msgs[0], timeout=10)
            # NOTE: the pending marks' steady state: Selects for the marks' TTL and a second
            # more, so the measured ones expire earlier ones' marks as a serving selector's do
            # (without it a run ends before the first mark is due: ~20 us of a Select left out)
            stop, i = time.perf_counter() + (0.0 if ns.quick else STEADY_S), 0
            while time.perf_counter() < stop:
                stub.Select(steady[i % len(steady)], timeout=10)
                i += 1
            parent.send("served")
            recv_from(parent, proc)  # NOTE: resets the server-side samples
            # NOTE: interleave the two in rounds so drift in machine load hits both alike
            ping_t: list[float] = []
            sel_t: list[float] = []
            for k in range(0, n, 100):
                ping_t += _latency(stub.Ping, lambda i: ping, min(100, n - k))
                sel_t += _latency(stub.Select, lambda i, k=k: sel_msgs[k + i], min(100, n - k))
            parent.send("served")
            served = recv_from(parent, proc)
            parent.send("untimed")
        # NOTE: alternate short Ping / Select windows; the medians resist load drift.
        rounds = 2 if ns.quick else ns.rounds
        tp_ping_l, tp_sel_l = [], []
        cpu: dict[str, list[dict[str, float]]] = {"ping": [], "select": []}
        assert proc.pid is not None
        for _ in range(rounds):
            cpu["ping"].append(_cpu_throughput(address, "Ping", [ping], ns, proc.pid))
            cpu["select"].append(_cpu_throughput(address, "Select", sel_msgs, ns, proc.pid))
            tp_ping_l.append(cpu["ping"][-1]["rps"])
            tp_sel_l.append(cpu["select"][-1]["rps"])
        tp_ping, tp_sel = float(np.median(tp_ping_l)), float(np.median(tp_sel_l))
        tp_ratio = float(np.median(np.asarray(tp_sel_l) / np.asarray(tp_ping_l)))
        lane = None
        if num_replicas == max(ns.replicas) and info.get("fast_lane_port"):
            lane = _fast_lane(f"127.0.0.1:{info['fast_lane_port']}", sel_msgs, ns, proc.pid)
        wire = _wire_ingest(address, 100 if ns.quick else 500, ns.seed + 4)
        parent.send("stop")
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
    ping_p, sel_p = _pcts(ping_t), _pcts(sel_t)
    return {
        "num_replicas": num_replicas,
        "blocks_per_replica": ns.blocks_per_replica,
        **info,
        "ping": ping_p,
        "select": sel_p,
        "select_over_ping_p50": sel_p["p50_us"] / ping_p["p50_us"],
        "select_over_ping_p99": sel_p["p99_us"] / ping_p["p99_us"],
        "core_in_server": served,
        "throughput_ping_rps": tp_ping,
        "throughput_select_rps": tp_sel,
        "throughput_ratio": tp_ratio,
        "throughput_rounds": {"ping": tp_ping_l, "select": tp_sel_l},
        # NOTE: medians over the rounds; CPU is per call and in cores busy during the window
        "throughput_cpu": {
            m: {k: float(np.median([x[k] for x in xs])) for k in xs[0]} for m, xs in cpu.items()
        },
        "ingest_wire_events_per_s": wire,
        "fast_lane": lane,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--replicas", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--blocks-per-replica", type=int, default=100_000)
    p.add_argument("--copies", type=int, default=2, help="replicas holding each chain")
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--rounds", type=int, default=6, help="alternating Ping/Select throughput rounds"
    )
    p.add_argument("--window-s", type=float, default=0.5, help="length of one throughput window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    p.add_argument(
        "--procs",
        type=int,
        nargs="*",
        default=[1, 2, 4],
        help="selection processes for the scaling run at the largest R (empty: skip)",
    )
    p.add_argument("--client-procs", type=int, default=2, help="client processes (at least N)")
    p.add_argument("--fast-lane-client-procs", type=int, default=1,
                   help="client processes of the fast lane's closed loop (largest R)")
    p.add_argument("--scale-rounds", type=int, default=3)
    p.add_argument("--scaling-front", choices=("grpc", "lane"), default="grpc",
                   help="scaling run: the clients call gRPC or the Select fast lane")
    p.add_argument("--pin", action="store_true",
                   help="scaling run: selection process k on CPU k, clients on the CPUs left")
    p.add_argument("--reuseport", action="store_true",
                   help="scaling run: the N processes share one port (grpc.so_reuseport)")
    p.add_argument("--client-channels", type=int, default=4,
                   help="with --reuseport: connections per client process")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    ns = p.parse_args(argv)
    if ns.pin and ns.procs and max(ns.procs) >= (os.cpu_count() or 1):
        p.error(f"--pin needs more CPUs than selection processes ({max(ns.procs)} >= "
                f"{os.cpu_count()})")
    if ns.reuseport and ns.scaling_front == "lane":
        p.error("--reuseport is a gRPC option: use it with --scaling-front grpc")
    rows = []
    for r in ns.replicas:
        rows.append(run_one(r, ns))
        print(table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else table(rows), flush=True)
    print()
    print(table(rows))
    print()
    print(cpu_table(rows))
    for r in rows:
        fl = r["core_in_server"].get("flush_wall")
        if fl:
            print(f"R={r['num_replicas']} in the server: the answer {r['core_in_server']['wall']['p50_us']:.0f}"
                  f" us p50, then the route after it (flush) {fl['p50_us']:.0f} us p50 / "
                  f"{fl['p99_us']:.0f} p99")  # fmt: skip
        if r["fast_lane"]:
            x = r["fast_lane"]
            print(f"R={r['num_replicas']} fast lane: {x['select_rps']:.0f} Select/s "
                  f"({x['client_procs']} client procs), server {x['server_cpu_us']:.0f} us CPU "
                  f"per Select = {1e6 / x['server_cpu_us']:.0f}/s per core; gRPC "
                  f"{r['throughput_select_rps']:.0f} Select/s")  # fmt: skip
    from benchmarks.selector_scaling import run_scaling  # NOTE: it imports this module

    scaling = run_scaling(ns) if ns.procs else None
    figs = issue_figures(rows, scaling)
    print()
    print(figures_table(figs))
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "argv": sys.argv[1:],
            "prompt_tokens": CHAIN_BLOCKS * BLOCK_SIZE,
            "block_size": BLOCK_SIZE,
        }
        meta["cpu_count"] = os.cpu_count()
        out = {"meta": meta, "results": rows, "scaling": scaling, "issue19": figs}
        ns.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
