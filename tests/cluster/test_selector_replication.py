"""Replicated selection service without Ray: real loopback servers, clients failing over
between them, a replica's KV stream reaching every selection replica, the registry format."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import pytest

from cluster.selector.client import AsyncSelectorClient, SelectorClient, split_addresses
from cluster.selector.server import ServerThread
from cluster.serve.app_reporting import SelectorSink
from cluster.serve.selector_registry import parse_entries
from kvmanager.events import BlockStored
from replicas.deployment import SinkSpec


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
            held.extend([4, 5])
            sink.publish([BlockStored([4, 5], 3, [], 16)])
            _wait(lambda: _resident(a, "rep-0") == 5 and _resident(b, "rep-0") == 5)
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
