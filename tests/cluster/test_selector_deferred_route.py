"""A Select that answers first and routes later (``SelectorCore.select_wire(defer=True)``, what
the gRPC servicer runs) against one that routes before answering: the same answers and the
same state after, whatever runs in between (events, loads, feedback, membership, the server's
``flush``), and the route made by the next holder of the core's lock at the latest."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from select_twins import core_state, random_select_request, twin_cores, twin_run

from cluster.selector.core import SelectorCore
from cluster.selector.server import ServerThread
from cluster.selector.types import LoadSnapshot, Outcome, SelectionRequest
from kvmanager.events import BlockRemoved, BlockStored
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc


def _between(core: SelectorCore, base: list[int], step: int, last_id: str) -> None:
    """One of the calls that may come between two Selects (the same on both twins);
    ``last_id``: the last Select's request id (its feedback pops what its route remembered)."""
    rid = f"r{step % 7}"
    rec = core._table.records.get(rid)
    kind = step % 6
    if rec is None or kind == 5:
        core.stats()
    elif kind == 0:
        core.apply_events(
            rid, rec.last_seq + 1, [BlockStored(base[step : step + 20], None, [], 16)]
        )
    elif kind == 1:
        core.apply_events(rid, rec.last_seq + 1, [BlockRemoved(base[step : step + 5])])
    elif kind == 2:
        core.update_load(rid, LoadSnapshot(num_blocks=4096, num_free_blocks=step % 4096,
                                           num_waiting_tokens=step))  # fmt: skip
    elif kind == 3:
        core.feedback(Outcome(last_id, rid, 512, 128, ttft_s=0.05))
    else:
        core.flush()


@pytest.mark.parametrize(("seed", "num_replicas"), [(11, 8), (12, 60)])
def test_deferred_route_gives_the_same_answers_and_state(seed: int, num_replicas: int) -> None:
    deferred, plain, base, rng, clock, probes = twin_run(seed, num_replicas)
    owed = 0
    for step in range(400):
        raw = random_select_request(rng, base, num_replicas)
        assert deferred.select_wire(raw, defer=True) == plain.select_wire(raw), step
        owed += deferred._deferred is not None
        if rng.random() < 0.5:
            for core in (deferred, plain):
                _between(core, base, step, pb.SelectRequest.FromString(raw).request_id)
        if step % 7 == 0:
            clock.advance(0.2)  # NOTE: pending marks fall due, some drained by flush()
        if step % 50 == 0:
            assert core_state(deferred, probes) == core_state(plain, probes), step
        if step == 200:
            for core in (deferred, plain):
                core.leave("r2")
                core.join("late", node_id="n9", num_blocks=4096)
    assert core_state(deferred, probes) == core_state(plain, probes)
    assert owed > 300  # NOTE: the routes were deferred (not the Python path's Selects)


_CALLS: dict[str, Callable[[SelectorCore], Any]] = {
    "join": lambda core: core.join("r0", node_id="n0", num_blocks=4096),
    "touch": lambda core: core.touch("r0"),
    "disconnect": lambda core: core.disconnect("r0"),
    "leave": lambda core: core.leave("r3"),
    "expire_stale": lambda core: core.expire_stale(),
    "apply_events": lambda core: core.apply_events("r0", 99, []),
    "resync": lambda core: core.resync("r1", 5, []),
    "update_load": lambda core: core.update_load("r0", LoadSnapshot(num_blocks=4096)),
    "feedback": lambda core: core.feedback(Outcome("x", "r0", 16, 1)),
    "select": lambda core: core.select(SelectionRequest("s", [1], 16)),
    "select_wire": lambda core: core.select_wire(
        pb.SelectRequest(block_hashes=[1]).SerializeToString()
    ),
    "flush": lambda core: core.flush(),
    "stats": lambda core: core.stats(),
    "counters": lambda core: core.counters,
    "list_replicas": lambda core: core.list_replicas(),
}


def test_a_due_mark_counts_for_nothing_and_expires_after_the_answer() -> None:
    """The deferred Select's expiry of due marks goes after its answer: the walk already
    leaves a due mark out, expired or not (``walk_kernel.walk``)."""
    (core, _), _ = twin_cores(22, 6)
    rng = np.random.default_rng(5)
    fresh = rng.integers(1, 1 << 64, 30, dtype=np.uint64).tolist()  # NOTE: held nowhere

    def select(defer: bool, speculative: bool = True) -> dict[str, int]:
        raw = pb.SelectRequest(block_hashes=fresh, num_prompt_tokens=480, max_results=0,
                               no_speculative_insert=not speculative).SerializeToString()
        ans = pb.SelectResponse.FromString(core.select_wire(raw, defer=defer))
        return {r.replica_id: r.terms.num_pending_blocks for r in ans.replicas}

    assert set(select(defer=False).values()) == {0}  # marks the winner's 30 blocks pending
    pending = select(defer=False, speculative=False)
    assert sorted(pending.values()) == [0] * 5 + [30]
    deadlines = core._index._deadlines
    assert deadlines.count == 30
    core.clock.advance(1.0)  # NOTE: past the 0.5 s TTL: due, not yet expired
    assert set(select(defer=True, speculative=False).values()) == {0}
    assert deadlines.count == 30 and core._deferred is not None  # the answer went first
    core.flush()
    assert deadlines.count == 0 and core._deferred is None


@pytest.mark.parametrize("call", list(_CALLS))
def test_every_call_makes_the_owed_route_first(call: str) -> None:
    (core, _), base = twin_cores(21, 6)
    raw = pb.SelectRequest(block_hashes=base[:40], num_prompt_tokens=640,
                           request_id="q1").SerializeToString()  # fmt: skip
    core.select_wire(raw, defer=True)
    assert core._deferred is not None and "q1" not in core._routed
    _CALLS[call](core)
    # NOTE: read without the lock; ``_routed`` is written by the route alone
    assert core._deferred is None
    assert "q1" in core._routed


def test_the_server_routes_after_answering() -> None:
    (core, _), base = twin_cores(31, 4)
    with ServerThread(core) as st, grpc.insecure_channel(f"127.0.0.1:{st.port}") as ch:
        stub = pb_grpc.CacheSelectionStub(ch)
        fresh = np.random.default_rng(3).integers(1, 1 << 63, 30).tolist()
        resp = stub.Select(pb.SelectRequest(block_hashes=base[:10] + fresh,
                                            num_prompt_tokens=640, request_id="q7"))  # fmt: skip
        winner = resp.replicas[0].replica_id
        # NOTE: read without the core's lock (entering it would make the route itself); the
        # remembered request is the route's last write
        deadline = time.monotonic() + 5
        while "q7" not in core._routed and time.monotonic() < deadline:
            time.sleep(0.001)
        assert "q7" in core._routed and core._deferred is None
        pending = {r.replica_id: r.num_pending_blocks for r in core.list_replicas()}
        assert pending[winner] >= len(fresh)
