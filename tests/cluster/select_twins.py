"""Twin selection cores and random Select requests: the fixtures of the tests that hold a
compiled path to the path it replaces (same answers, same state after)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from selector_helpers import FakeClock

from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.types import LoadSnapshot
from cluster.selector.wire import decode_select, encode_select
from kvmanager.events import MEDIUM_CPU, BlockStored
from protos import cache_selection_pb2 as pb


def unfused(core: SelectorCore, raw: bytes) -> bytes:
    req, cands, policy, k, spec = decode_select(raw, core.config.max_prompt_blocks)
    return encode_select(core.select(req, cands, policy, k, spec))


def twin_cores(seed: int, num_replicas: int, **cfg: Any) -> tuple[list[SelectorCore], list[int]]:
    """Two cores with the same replicas, blocks (device and host tier) and loads."""
    rng = np.random.default_rng(seed)
    clock = FakeClock()
    base = rng.integers(1, 1 << 64, 3000, dtype=np.uint64).tolist()
    cores = [SelectorCore(CoreConfig(stale_after_s=1e9, pending_ttl_s=0.5, **cfg), clock=clock)
             for _ in range(2)]  # fmt: skip
    for i in range(num_replicas):
        start, n = int(rng.integers(0, 2800)), int(rng.integers(1, 200))
        host = base[int(rng.integers(0, 2900)) :][:40]
        load = LoadSnapshot(num_blocks=4096, num_free_blocks=int(rng.integers(0, 4096)),
                            num_waiting_tokens=int(rng.integers(0, 5000)),
                            ttft_ewma_s=float(rng.random()), f_total=float(rng.random()),
                            prefill_tokens_per_s=float(rng.integers(0, 20000)))  # fmt: skip
        for core in cores:
            core.join(f"r{i}", node_id=f"n{i % 3}", num_blocks=4096)
            core.apply_events(f"r{i}", 0, [BlockStored(base[start : start + n], None, [], 16)])
            if i % 4 == 0:
                core.apply_events(f"r{i}", 1, [BlockStored(host, None, [], 16,
                                                           medium=MEDIUM_CPU)])  # fmt: skip
            core.update_load(f"r{i}", load)
    return cores, base


def random_select_request(rng: np.random.Generator, base: list[int], num_replicas: int) -> bytes:
    start = int(rng.integers(0, 2900))
    n = int(rng.integers(0, 100)) if rng.random() < 0.9 else 0
    hashes = base[start : start + n] + rng.integers(1, 1 << 64, int(rng.integers(0, 8)),
                                                   dtype=np.uint64).tolist()  # fmt: skip
    msg = pb.SelectRequest(block_hashes=hashes, num_prompt_tokens=16 * len(hashes),
                           max_results=int(rng.integers(0, 6)))  # fmt: skip
    if rng.random() < 0.7:
        msg.request_id = f"q{int(rng.integers(1 << 30))}"
    if rng.random() < 0.4:
        ids = rng.integers(0, num_replicas + 3, int(rng.integers(1, 12))).tolist()
        msg.candidate_replica_ids.extend(f"r{i}" for i in ids)  # NOTE: >= num: unknown
    if rng.random() < 0.3:
        msg.no_speculative_insert = True
    if rng.random() < 0.5:
        msg.origin_node_id = ["n0", "n1", "n2", "elsewhere"][int(rng.integers(0, 4))]
    if rng.random() < 0.3:
        msg.num_output_tokens = int(rng.integers(1, 500))
    if rng.random() < 0.2:
        msg.policy = "tinyserve"
    if rng.random() < 0.1:
        msg.session_id = "s1"
    return msg.SerializeToString()


def core_state(core: SelectorCore, probes: list[list[int]]) -> Any:
    """What a Select can change, read through the owners' own APIs."""
    t = core._table
    out: list[Any] = [t.ints.tolist(), t.floats.tolist(), dict(core.counters),
                      dict(core.stats().decisions), list(core._routed.items()),
                      sorted((r.replica_id, r.num_inflight_tokens) for r in t.records.values()),
                      [(r.replica_id, r.num_pending_blocks) for r in core.list_replicas()]]  # fmt: skip
    for h in probes:
        m = core._index.match(h, t.live_mask)
        matched, _, _ = m.arrays(t.capacity)
        out += [m.resident, m.pending, m.host,
                core._access.hotness(h, matched, m.lengths()).tolist()]  # fmt: skip
    return out


class TwinRun(NamedTuple):
    """Twin cores on one clock, the request generator and the prefixes ``core_state`` probes."""

    a: SelectorCore
    b: SelectorCore
    base: list[int]
    rng: np.random.Generator
    clock: FakeClock
    probes: list[list[int]]


def twin_run(seed: int, num_replicas: int) -> TwinRun:
    (a, b), base = twin_cores(seed, num_replicas)
    assert isinstance(a.clock, FakeClock)
    probes = [base[s : s + 60] for s in range(0, 2900, 97)]
    return TwinRun(a, b, base, np.random.default_rng(seed + 100), a.clock, probes)
