"""The selector benchmarks' fixture: a synthetic fleet index and the server process.

R replicas hold ``blocks_per_replica`` resident blocks each, laid out as 128-block chains
(2048-token prompts at block_size 16), every chain resident on ``copies`` replicas; prompts
share a random-length prefix with one chain. ``_server_main`` runs the selection service
over that index in its own process and measures the service-side compute per Select.
Used by ``selector_bench.py`` and ``selector_scaling.py``.
"""

from __future__ import annotations

import gc
import resource
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

CHAIN_BLOCKS = 128
BLOCK_SIZE = 16


def chain_hashes(chain_ids: np.ndarray) -> np.ndarray:
    """[len(chain_ids), CHAIN_BLOCKS] distinct 63-bit hashes, a pure function of the chain id."""
    x = (chain_ids.astype(np.uint64)[:, None] << np.uint64(8)) | np.arange(
        CHAIN_BLOCKS, dtype=np.uint64
    )[None, :]
    with np.errstate(over="ignore"):
        z = x * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(29))
    return (z >> np.uint64(1)).astype(np.int64)


def layout(num_replicas: int, blocks_per_replica: int, copies: int) -> tuple[int, int]:
    """(num_chains, chains per replica): chain c lives on replicas (c + j) % R, j < copies."""
    per_replica = max(blocks_per_replica // CHAIN_BLOCKS, 1)
    copies = min(copies, num_replicas)
    return max(per_replica * num_replicas // copies, 1), per_replica


def prompts(num: int, num_chains: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    chains = rng.integers(0, num_chains, num)
    shared = rng.integers(0, CHAIN_BLOCKS + 1, num)
    full = chain_hashes(chains)
    fresh = rng.integers(1 << 62, 1 << 63, (num, CHAIN_BLOCKS))
    return [
        list(full[i, : shared[i]].tolist()) + fresh[i, shared[i] :].tolist() for i in range(num)
    ]


def _pcts(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e6
    return {
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
    }


def recv_from(conn: Any, proc: Any) -> Any:
    """``conn.recv()`` from the server process ``proc``, but RuntimeError (with its exit code)
    once it has died instead of waiting forever (an import error there left a benchmark
    hanging on the GPU host)."""
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"selection server process exited (code {proc.exitcode})")
    return conn.recv()


def _rss_mb() -> float:
    """Resident set size now (MB); ``ru_maxrss`` is the peak (it includes population)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _populate(core: Any, num_replicas: int, blocks_per_replica: int, copies: int) -> int:
    """Join R replicas and resync each with its chains; returns the number of chains."""
    num_chains, _ = layout(num_replicas, blocks_per_replica, copies)
    for r in range(num_replicas):
        rid = f"replica-{r}"
        core.join(
            rid, node_id=f"node-{r // 8}", block_size=BLOCK_SIZE, num_blocks=2 * blocks_per_replica
        )
        first = (
            r - np.arange(min(copies, num_replicas))
        ) % num_replicas  # chains c: (c + j) % R == r
        ids = np.concatenate([np.arange(f, num_chains, num_replicas) for f in first])
        core.resync(rid, 0, chain_hashes(ids).ravel())
    return num_chains


# ------------------------------------------------------------------------------ server process
def _timed(fn: Any, samples: list[tuple[float, float]]) -> Any:
    """``fn`` appending (wall, thread CPU) seconds per call to ``samples``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        out = fn(*args, **kwargs)
        samples.append((time.perf_counter() - t, time.thread_time() - c))
        return out

    return timed


def _server_main(
    conn: Connection,
    num_replicas: int,
    blocks_per_replica: int,
    copies: int,
    seed: int,
    quick: bool,
) -> None:
    from cluster.selector.convert import select_request_from_proto, selection_to_proto
    from cluster.selector.core import CoreConfig, SelectorCore
    from cluster.selector.server import ServerThread
    from cluster.selector.types import SelectionRequest
    from cluster.selector.wire import decode_select, encode_select
    from kvmanager.events import BlockRemoved, BlockStored
    from protos import cache_selection_pb2 as pb

    # NOTE: the synthetic replicas never heartbeat; keep them from expiring mid-run.
    core = SelectorCore(CoreConfig(stale_after_s=1e9))
    t0 = time.perf_counter()
    num_chains = _populate(core, num_replicas, blocks_per_replica, copies)
    populate_s = time.perf_counter() - t0
    gc.collect()
    gc.freeze()  # NOTE: the bulk index is long-lived; keep it out of every later GC pass
    resident = sum(r.num_resident_blocks for r in core.list_replicas())

    # service-side compute (no gRPC), sequential
    ps = prompts(300 if quick else 2000, num_chains, seed + 1)
    core_t, core_cpu, full_t = [], [], []
    for i, h in enumerate(ps):
        req = SelectionRequest(f"c{i}", h, CHAIN_BLOCKS * BLOCK_SIZE)
        t, c = time.perf_counter(), time.thread_time()
        core.select(req, max_results=4)
        # NOTE: thread CPU time excludes time the process sat descheduled on a busy machine.
        core_cpu.append(time.thread_time() - c)
        core_t.append(time.perf_counter() - t)
    for i, h in enumerate(ps):
        msg = pb.SelectRequest(
            request_id=f"f{i}",
            block_hashes=h,
            num_prompt_tokens=CHAIN_BLOCKS * BLOCK_SIZE,
            max_results=4,
        )
        t = time.perf_counter()
        req, cands = select_request_from_proto(msg, core.config.max_prompt_blocks)
        selection_to_proto(core.select(req, cands, max_results=4))
        full_t.append(time.perf_counter() - t)

    wire_t = []
    # NOTE: what the servicer's raw codec and the fast lane call (one compiled call since
    # the seventh pass; decode -> select -> encode before)
    fused = hasattr(core, "select_wire")
    for i, h in enumerate(ps):
        raw = pb.SelectRequest(
            request_id=f"w{i}",
            block_hashes=h,
            num_prompt_tokens=CHAIN_BLOCKS * BLOCK_SIZE,
            max_results=4,
        ).SerializeToString()
        t = time.perf_counter()
        if fused:
            core.select_wire(raw)
        else:
            req, cands, policy, k, spec = decode_select(raw, core.config.max_prompt_blocks)
            encode_select(core.select(req, cands, policy, k, spec))
        wire_t.append(time.perf_counter() - t)

    # event ingestion in-process: store then remove 64-block batches on one replica
    core.join("ingest", block_size=BLOCK_SIZE)
    rng = np.random.default_rng(seed + 2)
    batches = [rng.integers(1 << 62, 1 << 63, 64).tolist() for _ in range(200 if quick else 1000)]
    t = time.perf_counter()
    seq = 0
    for b in batches:
        core.apply_events("ingest", seq, [BlockStored(b, None, [], BLOCK_SIZE)])
        seq += 1
    for b in batches:
        core.apply_events("ingest", seq, [BlockRemoved(b)])
        seq += 1
    ingest_s = time.perf_counter() - t
    core.leave("ingest")

    server = ServerThread(core, fast_lane_port=0).start()
    lane = server.fast_lane_address
    conn.send(
        {
            "port": server.port,
            "fast_lane_port": int(lane.rpartition(":")[2]) if lane else None,
            "num_chains": num_chains,
            "populate_s": populate_s,
            "resident_blocks": resident,
            "unique_blocks": core.stats().num_unique_blocks,
            "rss_mb": _rss_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "index_mb": core._index.nbytes() / 2**20,
            "compute_core": _pcts(core_t),
            "compute_core_cpu": _pcts(core_cpu),
            "compute_with_proto": _pcts(full_t),
            "compute_with_wire": _pcts(wire_t),
            "ingest_inproc_events_per_s": 2 * 64 * len(batches) / ingest_s,
        }
    )
    # NOTE: the same call timed while it serves RPCs: between calls gRPC's own work evicts
    # its code and data from the caches, so it is slower there than in the loop above. With
    # ``select_wire`` (the servicer's call since the seventh pass) the figure includes the
    # request's decoding and the answer's encoding, which ``core.select``'s did not.
    served: list[tuple[float, float]] = []
    flushed: list[tuple[float, float]] = []
    timed = {"select_wire" if fused else "select": served}
    if hasattr(core, "flush"):
        # NOTE: since the ninth pass the servicer answers first and makes the Select's route
        # in ``flush`` after; timed apart (the answer's path is the figure above)
        timed["flush"] = flushed
    for name, samples in timed.items():
        setattr(core, name, _timed(getattr(core, name), samples))
    while (msg := conn.recv()) != "stop":
        if msg == "untimed":
            # NOTE: the closed loops run without the timing: its two thread_time() calls took
            # ~7% of the server's samples (py-spy) at fast lane rates
            for name in timed:
                delattr(core, name)
            continue
        conn.send({"wall": _pcts([x[0] for x in served]) if served else None,
                   "cpu": _pcts([x[1] for x in served]) if served else None,
                   "flush_wall": _pcts([x[0] for x in flushed]) if flushed else None,
                   "flush_cpu": _pcts([x[1] for x in flushed]) if flushed else None})  # fmt: skip
        served.clear()
        flushed.clear()
    server.stop()
