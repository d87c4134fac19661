"""Client helpers against a real loopback server: deadlines/outage, reporter resync and
outcomes (feedback on the ReportKV stream)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest
from ports import free_port
from prometheus_client import generate_latest

from cluster.selector.client import AsyncSelectorClient, SelectorClient
from cluster.selector.core import SelectorCore
from cluster.selector.core_types import ApplyResult
from cluster.selector.reporter import KVReporter
from cluster.selector.server import ServerThread
from cluster.selector.types import LoadSnapshot, Outcome, SelectionRequest
from kvmanager.events import BlockRemoved, BlockStored, KVEvent
from protos import cache_selection_pb2 as pb


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_select_returns_none_on_outage_and_raises_on_bad_input() -> None:
    dead = SelectorClient(f"127.0.0.1:{free_port()}", timeout_s=0.2)
    t0 = time.monotonic()
    assert dead.select([1, 2], 32) is None
    assert time.monotonic() - t0 < 5
    assert not dead.feedback(Outcome("q", "r", 1, 0), timeout_s=0.2)
    dead.close()
    with ServerThread() as st:
        cl = SelectorClient(st.address, timeout_s=5)
        st.core.join("r0")
        sel = cl.select([1, 2], 32, request_id="q1")
        assert sel is not None and sel.replica_id == "r0" and sel.policy == "tinyserve"
        assert cl.feedback(Outcome("q1", "r0", 32, 0))
        with pytest.raises(ValueError, match="unknown policy"):
            cl.select([1], 16, policy="magic")
        cl.close()


def test_async_client() -> None:
    with ServerThread() as st:
        st.core.join("a")

        async def go() -> tuple[str | None, object]:
            cl = AsyncSelectorClient(st.address, timeout_s=5)
            try:
                sel = await cl.select([5, 6], 32)
                dead = AsyncSelectorClient(f"127.0.0.1:{free_port()}", timeout_s=0.2)
                missing = await dead.select([5], 16)
                await dead.close()
                return (sel.replica_id if sel else None), missing
            finally:
                await cl.close()

        assert asyncio.run(go()) == ("a", None)


def _resident(st: ServerThread, rid: str) -> int:
    return {r.replica_id: r.num_resident_blocks for r in st.core.list_replicas()}.get(rid, -1)


def test_reporter_streams_events_and_resyncs_after_a_gap() -> None:
    pool: set[int] = {100, 101}
    with ServerThread() as st:
        rep = KVReporter(
            st.address,
            "rep",
            resident_hashes=lambda: sorted(pool),
            hello=pb.ReplicaHello(block_size=16),
            heartbeat_s=0.2,
        )
        rep.start()
        try:
            _wait(lambda: _resident(st, "rep") == 2)
            pool.update([102, 103])
            assert rep.publish([BlockStored([102, 103], 101, [], 16)]) == 1
            _wait(lambda: _resident(st, "rep") == 4)
            assert rep.snapshot(LoadSnapshot(num_blocks=64, num_free_blocks=7))
            _wait(lambda: st.core.list_replicas()[0].load.num_free_blocks == 7)
            # desynchronise the service behind the reporter's back: its next batch is a gap
            st.core.resync("rep", 50, [])
            pool.discard(100)
            rep.publish([BlockRemoved([100])])
            _wait(lambda: rep.num_resyncs_requested >= 1 and _resident(st, "rep") == 3)
            gone = st.core.select(SelectionRequest("x", [100, 101], 32), speculative=False)
            kept = st.core.select(SelectionRequest("y", [101, 102, 103], 48), speculative=False)
            assert gone.ranked[0].terms.num_matched_blocks == 0  # 100 was removed before the gap
            assert kept.ranked[0].terms.num_matched_blocks == 3
            assert rep.num_connects >= 2
        finally:
            rep.stop()


def test_reporter_reconnects_after_a_service_restart() -> None:
    port = free_port()
    rep = KVReporter(
        f"127.0.0.1:{port}",
        "phoenix",
        resident_hashes=lambda: [7, 8, 9],
        retry_s=0.05,
        heartbeat_s=0.2,
    )
    rep.start()
    try:
        with ServerThread(port=port) as st:
            _wait(lambda: _resident(st, "phoenix") == 3)
        with ServerThread(port=port) as st2:  # a fresh service with an empty index
            _wait(lambda: _resident(st2, "phoenix") == 3)
    finally:
        rep.stop()


class _RecordingCore(SelectorCore):
    """A core that logs the order in which a stream's batches and outcomes reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, object]] = []

    def apply_events(self, replica_id: str, seq: int, events: Sequence[KVEvent]) -> ApplyResult:
        self.log.append(("batch", seq))
        return super().apply_events(replica_id, seq, events)

    def feedback(self, outcome: Outcome) -> bool:
        self.log.append(("feedback", outcome.request_id))
        return super().feedback(outcome)


def test_reporter_sends_outcomes_in_order_with_events() -> None:
    core = _RecordingCore()
    with ServerThread(core) as st:
        rep = KVReporter(st.address, "fb", resident_hashes=lambda: [1], heartbeat_s=0.2).start()
        try:
            _wait(lambda: _resident(st, "fb") == 1)
            sel = core.select(SelectionRequest("q1", [1, 2], 32))
            assert sel.replica_id == "fb"
            assert rep.publish([BlockStored([2], 1, [], 16)]) == 1
            assert rep.outcome(Outcome("q1", "fb", 32, 16, ttft_s=0.01, num_output_tokens=4))
            assert rep.publish([BlockStored([3], 2, [], 16)]) == 2
            assert rep.outcome(Outcome("q2", "fb", 48, 0, ttft_s=0.02))
            _wait(lambda: core.counters["feedback"] == 2)
            assert core.log == [("batch", 1), ("feedback", "q1"), ("batch", 2), ("feedback", "q2")]
            text = generate_latest(core.metrics.registry).decode()
            assert "tinyserve_selector_realised_hit_tokens_total 16.0" in text  # q1 was routed
            assert rep.num_outcomes_dropped == 0
        finally:
            rep.stop()
    # no stream any more: outcomes are dropped (counted), never queued for later
    assert not rep.outcome(Outcome("q3", "fb", 16, 0))
    assert rep.num_outcomes_dropped == 1


def test_reporter_drops_outcomes_past_its_bound_without_blocking() -> None:
    """A stream that does not drain: outcomes past ``max_outcomes`` are dropped at once, KV
    events still queue, and outcomes taken by gRPC make room again."""
    rep = KVReporter(f"127.0.0.1:{free_port()}", "full", max_outcomes=3)  # NOTE: not started
    q = rep._open()  # the connection's queue, nobody consuming it
    t0 = time.monotonic()
    accepted = [rep.outcome(Outcome(f"q{i}", "full", 16, 0)) for i in range(1000)]
    assert time.monotonic() - t0 < 1.0
    assert accepted == [True] * 3 + [False] * 997 and rep.num_outcomes_dropped == 997
    assert rep.publish([BlockStored([5], None, [], 16)]) == 1  # events are never dropped
    closed = threading.Event()
    messages = rep._messages(q, closed)
    kinds = [next(messages).WhichOneof("body") for _ in range(q.qsize())]
    assert kinds == ["hello", "resync", "feedback", "feedback", "feedback", "batch"]
    assert rep.outcome(Outcome("again", "full", 16, 0))
    closed.set()
