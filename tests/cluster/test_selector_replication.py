"""Replicated selection service without Ray: real loopback servers, clients failing over
between them, a replica's KV stream (and its outcomes) reaching every selection replica, the
registry format."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import pytest

from cluster.selector.client import AsyncSelectorClient, SelectorClient, split_addresses
from cluster.selector.core import SelectorCore
from cluster.selector.server import ServerThread
from cluster.selector.types import SelectionRequest
from cluster.serve.app_reporting import SelectorSink
from cluster.serve.selector_registry import parse_entries
from kvmanager.events import BlockStored
from replicas.deployment import SinkSpec
from replicas.outputs import RequestMetrics, RequestOutput


def _wait(cond: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _resident(st: ServerThread, rid: str) -> int:
    return {r.replica_id: r.num_resident_blocks for r in st.core.list_replicas()}.get(rid, -1)


def test_split_addresses() -> None:
    assert split_addresses("a:1, b:2,") == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        split_addresses(" , ")


def test_client_fails_over_from_a_dead_replica_every_time() -> None:
    with ServerThread() as live:
        live.core.join("r0")
        # NOTE: the dead address first in both orders: whichever the random primary is, every
        # Select is answered by the live replica within its deadline.
        for address in (f"{_dead_address()},{live.address}", f"{live.address},{_dead_address()}"):
            cl = SelectorClient(address, timeout_s=2.0)
            answers = [cl.select([1, 2], 32, candidate_replica_ids=["r0"]) for _ in range(20)]
            assert all(a is not None and a.replica_id == "r0" for a in answers)
            cl.close()
        assert live.core.stats().counters["selects"] == 40


def test_client_skips_a_replica_that_knows_none_of_the_candidates() -> None:
    """A restarted replica that has not been resynced answers 'all unknown': ask the next."""
    with ServerThread() as fresh, ServerThread() as synced:
        synced.core.join("r0")
        for order in ((fresh, synced), (synced, fresh)):
            cl = SelectorClient(",".join(s.address for s in order), timeout_s=2.0)
            for _ in range(10):
                sel = cl.select([1], 16, candidate_replica_ids=["r0"])
                assert sel is not None and sel.replica_id == "r0"
            cl.close()
        # with nobody synced, the (empty) answer still comes back rather than an outage
        lonely = SelectorClient(fresh.address, timeout_s=2.0)
        sel = lonely.select([1], 16, candidate_replica_ids=["r0"])
        assert sel is not None and sel.ranked == [] and sel.num_unknown_replicas == 1
        lonely.close()


def test_async_client_fails_over_and_returns_none_when_all_are_down() -> None:
    with ServerThread() as live:
        live.core.join("a")

        async def go() -> tuple[list[str | None], object]:
            cl = AsyncSelectorClient(f"{_dead_address()},{live.address}", timeout_s=2.0)
            dead = AsyncSelectorClient(f"{_dead_address()},{_dead_address()}", timeout_s=0.3)
            try:
                got = [await cl.select([5, 6], 32) for _ in range(10)]
                return [s.replica_id if s else None for s in got], await dead.select([5], 16)
            finally:
                await cl.close()
                await dead.close()

        ids, none = asyncio.run(go())
        assert ids == ["a"] * 10 and none is None


def _realised(st: ServerThread) -> float:
    registry = st.core.metrics.registry
    return registry.get_sample_value("tinyserve_selector_realised_hit_tokens_total") or 0.0


def _output(request_id: str, num_prompt_tokens: int, num_cached_tokens: int) -> RequestOutput:
    return RequestOutput(request_id, [1], "", True, "length", num_prompt_tokens,
                         num_cached_tokens, 1, None, RequestMetrics(ttft_s=0.01))  # fmt: skip


def _spec(address: str, hashes: list[int]) -> SinkSpec:
    return SinkSpec(address, "rep-0", "node-0", 16, 64, "fast", resident_hashes=lambda: hashes)


def test_sink_streams_to_every_selection_replica_and_follows_the_directory() -> None:
    """Events reach both replicas; a replica that appears in the directory later is resynced
    in full; feedback reaches all of them."""
    held = [1, 2, 3]
    with ServerThread() as a, ServerThread() as b:
        directory = [a.address, b.address]
        sink = SelectorSink(
            _spec(f"{a.address},{b.address}", held), directory=lambda: directory, refresh_s=0.05
        )
        try:
            _wait(lambda: _resident(a, "rep-0") == 3 and _resident(b, "rep-0") == 3)
            for st in (a, b):  # routed there, so the outcome also counts as realised hits
                st.core.select(SelectionRequest("q1", [1, 2, 3, 4, 5], 80), speculative=False)
            held.extend([4, 5])
            sink.publish([BlockStored([4, 5], 3, [], 16)])
            sink.feedback("q1", _output("q1", num_prompt_tokens=80, num_cached_tokens=48))
            for st in (a, b):  # the outcome rides each stream, behind the batch before it
                _wait(lambda st=st: st.core.counters["feedback"] == 1)
                assert _resident(st, "rep-0") == 5
                assert _realised(st) == 48.0
            with ServerThread() as c:
                c_address = c.address
                directory.append(c_address)
                _wait(lambda: _resident(c, "rep-0") == 5)
                assert sink.connected()
                sel = SelectorClient(c_address, timeout_s=2.0).select([1, 2, 3, 4, 5], 80)
                assert sel is not None and sel.ranked[0].terms.num_matched_blocks == 5
            # c is gone (stopped) and left the directory: its stream is dropped
            directory.remove(c_address)
            _wait(lambda: c_address not in sink.reporters)
            assert set(sink.reporters) == {a.address, b.address}
        finally:
            sink.close()


def test_sink_feedback_skips_a_disconnected_selection_replica_without_blocking() -> None:
    dead = _dead_address()
    with ServerThread() as a:
        sink = SelectorSink(_spec(f"{a.address},{dead}", [1]))
        try:
            _wait(lambda: sink.reporters[a.address].connected.is_set() and _resident(a, "rep-0") == 1)
            t0 = time.monotonic()
            for i in range(100):
                sink.feedback(f"q{i}", _output(f"q{i}", num_prompt_tokens=16, num_cached_tokens=0))
            assert time.monotonic() - t0 < 1.0
            _wait(lambda: a.core.counters["feedback"] == 100)
            # NOTE: the dead one's outcomes are dropped, most of them counted; those queued
            # during a connection attempt are lost with it (KVReporter.outcome)
            assert sink.reporters[dead].num_connects >= 1
        finally:
            sink.close()


def test_registry_keeps_fresh_entries_only() -> None:
    now = 1000.0
    values = [
        json.dumps({"address": "h:2", "t": now - 1}).encode(),
        json.dumps({"address": "h:1", "t": now - 0.5}).encode(),
        json.dumps({"address": "h:3", "t": now - 60}).encode(),  # stopped heartbeating
        json.dumps({"address": "h:1", "t": now}).encode(),
        b"not json",
    ]
    assert parse_entries(values, now, max_age_s=5.0) == ["h:1", "h:2"]


def test_a_port_held_by_a_sibling_server_is_not_bindable_until_it_stops() -> None:
    from cluster.serve.app_selector import bindable

    server = ServerThread(SelectorCore(), host="127.0.0.1", port=0).start()
    port = server.port
    try:
        assert not bindable("127.0.0.1", port)
    finally:
        server.stop()
    _wait(lambda: bindable("127.0.0.1", port))
