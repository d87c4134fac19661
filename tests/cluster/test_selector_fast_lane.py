"""The Select fast lane against real loopback servers and sockets: same answers as gRPC,
pipelining, refusals that leave the server up, auth, and the client's fallback to gRPC."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from ports import free_port
from selector_helpers import FakeClock
from tls_certs import make_pki

from cluster.selector.client import AsyncSelectorClient
from cluster.selector.core import SelectorCore
from cluster.selector.fast_lane_client import FastLaneClient
from cluster.selector.fast_lane_frames import HEADER, MAX_FRAME_BYTES, FastLaneError, Kind, frame
from cluster.selector.grpc_tls import TLSSettings
from cluster.selector.server import ServerThread
from cluster.serve.selector_registry import parse_fast_lanes
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc

NUM_REPLICAS = 6


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _core(clock: Callable[[], float] = time.monotonic) -> SelectorCore:
    """Replica r holds blocks 1..(r + 1) * 10 of one chain and 1000r..1000r + 49."""
    core = SelectorCore(clock=clock)
    for r in range(NUM_REPLICAS):
        core.join(f"r{r}", node_id=f"n{r // 2}", num_blocks=1000)
        core.resync(f"r{r}", 0, [*range(1, (r + 1) * 10 + 1), *range(1000 * r, 1000 * r + 50)])
    return core


def _requests() -> list[pb.SelectRequest]:
    out = []
    for i in range(24):
        hashes = [*range(1, 1 + 3 * i), *range(10**6 + 100 * i, 10**6 + 100 * i + 8)]
        if i % 3 == 0:
            hashes = [*range(1000 * (i % NUM_REPLICAS), 1000 * (i % NUM_REPLICAS) + 20)]
        out.append(pb.SelectRequest(
            request_id=f"q{i}", block_hashes=hashes, num_prompt_tokens=16 * len(hashes),
            max_results=3 if i % 2 else 0, no_speculative_insert=True,
            candidate_replica_ids=[f"r{r}" for r in range(NUM_REPLICAS) if (r + i) % 4]))  # fmt: skip
    return out


class _Raw:
    """A blocking socket speaking the lane's frames (no client library in between)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, int, bytes]:
        """(call id, kind, payload) of the next frame; ConnectionError once closed."""
        head = self._exactly(HEADER.size)
        length, call_id, kind = HEADER.unpack(head)
        return call_id, kind, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the server")
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def lane_server() -> Iterator[ServerThread]:
    with ServerThread(_core(), fast_lane_port=0) as st:
        yield st


def _lane_port(st: ServerThread) -> int:
    assert st.fast_lane_address is not None
    return int(st.fast_lane_address.rpartition(":")[2])


def test_same_answers_as_grpc(lane_server: ServerThread) -> None:
    st = lane_server
    reqs = _requests()
    with grpc.insecure_channel(st.address) as ch:
        stub = pb_grpc.CacheSelectionStub(ch)
        want = [stub.Select(r, timeout=10) for r in reqs]
    raw = _Raw(_lane_port(st))
    raw.send(frame(1, Kind.HELLO))
    assert raw.answer() == (1, Kind.OK, b"")
    for i, r in enumerate(reqs):
        raw.send(frame(100 + i, Kind.SELECT, r.SerializeToString()))
        call_id, kind, body = raw.answer()
        assert (call_id, kind) == (100 + i, Kind.OK)
        assert pb.SelectResponse.FromString(body) == want[i]
    raw.close()
    assert (
        any(len(w.replicas) > 1 for w in want) and len({w.replicas[0].replica_id for w in want}) > 1
    )


def test_pipelined_calls_are_answered_in_order_with_their_ids(lane_server: ServerThread) -> None:
    st = lane_server
    reqs = _requests()
    with grpc.insecure_channel(st.address) as ch:
        want = [pb_grpc.CacheSelectionStub(ch).Select(r, timeout=10) for r in reqs]
    raw = _Raw(_lane_port(st))
    # NOTE: every call in one write: the server sees them in one or few reads
    burst = [frame(0, Kind.HELLO)]
    burst += [frame(7000 + i, Kind.SELECT, reqs[i % len(reqs)].SerializeToString())
              for i in range(200)]  # fmt: skip
    raw.send(b"".join(burst))
    assert raw.answer()[:2] == (0, Kind.OK)
    for i in range(200):
        call_id, kind, body = raw.answer()
        assert (call_id, kind) == (7000 + i, Kind.OK)
        assert pb.SelectResponse.FromString(body) == want[i % len(reqs)]
    raw.close()

    async def many() -> list[bytes]:
        client = FastLaneClient(st.fast_lane_address or "")
        try:
            # NOTE: 300 concurrent calls on ONE connection; each must get its own answer
            out = await asyncio.gather(*(
                client.call(Kind.SELECT, reqs[i % len(reqs)].SerializeToString(), 10)
                for i in range(300)))  # fmt: skip
            assert st.core.metrics.fast_lane_connections._value.get() == 1
            return out
        finally:
            await client.close()

    _wait(lambda: st.core.metrics.fast_lane_connections._value.get() == 0)  # the raw one
    got = asyncio.run(many())
    # NOTE: the open-connections gauge counted that client and is back to 0 after close
    _wait(lambda: st.core.metrics.fast_lane_connections._value.get() == 0)
    assert [pb.SelectResponse.FromString(b) for b in got] == [
        want[i % len(reqs)] for i in range(300)
    ]


def test_bad_frames_fail_their_call_and_the_server_stays_up(lane_server: ServerThread) -> None:
    st = lane_server
    port = _lane_port(st)
    errors = st.core.metrics.errors
    malformed0 = errors.labels("malformed")._value.get()
    raw = _Raw(port)
    raw.send(frame(1, Kind.HELLO))
    raw.answer()
    raw.send(frame(2, Kind.SELECT, b"\x0f\xff\xff"))  # not a SelectRequest
    call_id, kind, body = raw.answer()
    assert (call_id, kind) == (2, Kind.INVALID_ARGUMENT) and b"malformed" in body
    assert errors.labels("malformed")._value.get() == malformed0 + 1
    too_long = pb.SelectRequest(block_hashes=range(1, st.core.config.max_prompt_blocks + 2))
    raw.send(frame(3, Kind.SELECT, too_long.SerializeToString()))
    assert raw.answer()[1:] == (
        Kind.INVALID_ARGUMENT,
        b"16385 block hashes exceed the limit of 16384",
    )
    raw.send(frame(4, 99))
    assert raw.answer()[:2] == (4, Kind.INVALID_ARGUMENT)
    raw.send(frame(5, Kind.PING))  # the connection is still good
    assert raw.answer() == (5, Kind.OK, b"")
    # an oversized frame: refused, that connection closed
    raw.send(HEADER.pack(MAX_FRAME_BYTES + 1, 6, Kind.SELECT))
    call_id, kind, body = raw.answer()
    assert (call_id, kind) == (6, Kind.TOO_LARGE) and b"exceeds" in body
    with pytest.raises(ConnectionError):
        raw.answer()
    raw.close()
    # a client that hangs up mid-frame
    half = _Raw(port)
    half.send(frame(1, Kind.HELLO) + frame(2, Kind.SELECT, b"\x12" * 50)[:20])
    half.close()
    # the server still answers new connections, and gRPC
    fresh = _Raw(port)
    fresh.send(frame(1, Kind.HELLO) + frame(2, Kind.SELECT, _requests()[0].SerializeToString()))
    assert fresh.answer()[1] == Kind.OK and fresh.answer()[1] == Kind.OK
    fresh.close()
    with grpc.insecure_channel(st.address) as ch:
        pb_grpc.CacheSelectionStub(ch).Ping(pb.PingRequest(), timeout=10)


def test_token_auth_on_connect() -> None:
    with ServerThread(_core(), token="s3cret", fast_lane_port=0) as st:
        port = _lane_port(st)
        unauth0 = st.core.metrics.errors.labels("unauthenticated")._value.get()
        for opening in (frame(1, Kind.SELECT, _requests()[0].SerializeToString()),  # no HELLO
                        frame(1, Kind.HELLO, b"wrong"), frame(1, Kind.HELLO)):  # fmt: skip
            raw = _Raw(port)
            raw.send(opening + frame(2, Kind.PING))
            assert raw.answer()[:2] == (1, Kind.UNAUTHENTICATED)
            with pytest.raises(ConnectionError):  # closed: the PING is never answered
                raw.answer()
            raw.close()
        assert st.core.metrics.errors.labels("unauthenticated")._value.get() == unauth0 + 3
        # refused on the header alone: the payload is never waited for
        for head in (HEADER.pack(1000, 1, Kind.SELECT), HEADER.pack(10**6, 1, Kind.HELLO)):
            raw = _Raw(port)
            raw.send(head)
            assert raw.answer()[:2] == (1, Kind.UNAUTHENTICATED)
            raw.close()
        raw = _Raw(port)
        raw.send(frame(1, Kind.HELLO, b"s3cret") + frame(2, Kind.PING))
        assert [raw.answer(), raw.answer()] == [(1, Kind.OK, b""), (2, Kind.OK, b"")]
        raw.close()

        async def wrong_token() -> None:
            client = FastLaneClient(st.fast_lane_address or "", token="nope")
            try:
                await client.call(Kind.PING, b"", 5)
            finally:
                await client.close()

        with pytest.raises(FastLaneError, match="UNAUTHENTICATED"):
            asyncio.run(wrong_token())


def _select_all(
    make: Callable[[], AsyncSelectorClient], reqs: list[pb.SelectRequest]
) -> tuple[list[list[str]], bool]:
    """Rankings of ``reqs`` through a client ``make()`` builds (on the loop: grpc.aio), and
    whether its fast lane was connected at the end."""

    async def go() -> tuple[list[list[str]], bool]:
        client = make()
        out = []
        for r in reqs:
            sel = await client.select(list(r.block_hashes), r.num_prompt_tokens,
                                      candidate_replica_ids=list(r.candidate_replica_ids),
                                      max_results=r.max_results, no_speculative_insert=True)  # fmt: skip
            assert sel is not None
            out.append([x.replica_id for x in sel.ranked])
        lane = client.lanes[0]
        connected = lane is not None and lane.connected
        await client.close()
        return out, connected

    return asyncio.run(go())


def test_client_uses_the_lane_and_falls_back_to_grpc() -> None:
    reqs = _requests()
    with ServerThread(_core(), token="t", fast_lane_port=0) as st:
        want, _ = _select_all(lambda: AsyncSelectorClient(st.address, token="t", timeout_s=5), reqs)
        lanes = {st.address: st.fast_lane_address or ""}
        selects0 = st.core.counters["selects"]
        got = _select_all(lambda: AsyncSelectorClient(st.address, "t", 5, fast_lanes=lanes), reqs)
        assert got == (want, True)
        assert st.core.counters["selects"] == selects0 + len(reqs)

        async def refused() -> None:
            client = AsyncSelectorClient(st.address, "t", 5, fast_lanes=lanes)
            with pytest.raises(ValueError, match="unknown policy"):
                await client.select([1, 2], 32, policy="magic")
            wrong = AsyncSelectorClient(st.address, "bad", 5, fast_lanes=lanes)
            with pytest.raises(PermissionError):
                await wrong.select([1, 2], 32)
            await client.close()
            await wrong.close()

        asyncio.run(refused())

        # the lane is down (nothing listens there): every call is answered over gRPC
        dead = {st.address: f"127.0.0.1:{free_port()}"}
        t0 = time.monotonic()
        got = _select_all(lambda: AsyncSelectorClient(st.address, "t", 0.5, fast_lanes=dead), reqs)
        assert got == (want, False)
        assert time.monotonic() - t0 < 5

        # a lane that never answers (a socket nobody accepts on: no HELLO answer): the
        # connect gets half the attempt, gRPC the rest, and the lane is left alone after
        with socket.socket() as hung:
            hung.bind(("127.0.0.1", 0))
            hung.listen(16)
            stuck = {st.address: f"127.0.0.1:{hung.getsockname()[1]}"}

            async def hung_lane() -> tuple[list[float], float]:
                client = AsyncSelectorClient(st.address, "t", 1.0, fast_lanes=stuck)
                took = []
                for r in reqs[:3]:
                    t = time.monotonic()
                    sel = await client.select(list(r.block_hashes), r.num_prompt_tokens,
                                              no_speculative_insert=True)  # fmt: skip
                    took.append(time.monotonic() - t)
                    assert sel is not None
                down_for = client._lane_down_until[0] - time.monotonic()
                await client.close()
                return took, down_for

            took, down_for = asyncio.run(hung_lane())
            assert 0.5 <= took[0] < 1.0 and max(took[1:]) < 0.5, took  # NOTE: the lane is skipped
            assert 0 < down_for <= 1.0

        async def lane_dies_mid_life() -> list[str]:
            client = AsyncSelectorClient(st.address, "t", 0.5, fast_lanes=lanes)
            first = await client.select([1, 2, 3], 48)
            lane = client.lanes[0]
            assert first is not None and lane is not None and lane.connected
            running = st._running
            assert running is not None and running.fast_lane is not None
            # NOTE: close the lane on the server's loop (its connections are dropped)
            await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(running.fast_lane.close(), st._loop)
            )
            after = await client.select([1, 2, 3], 48)
            await client.close()
            assert after is not None and not lane.connected
            return [first.replica_id, after.replica_id]

        a, b = asyncio.run(lane_dies_mid_life())
        assert a == b


def test_router_dials_a_standalone_services_lane() -> None:
    """``selector_fast_lanes`` (router kwargs): a router pointed at a standalone service sends
    its Selects over that service's lane (its connection shows in the service's gauge)."""
    from cluster.serve.router import TinyServeRouter

    with ServerThread(_core(), fast_lane_port=0) as st:
        assert st.fast_lane_address is not None
        router = TinyServeRouter.__new__(TinyServeRouter)  # NOTE: no Serve around it
        router.initialize_state(
            selector_address=st.address, selector_fast_lanes=st.fast_lane_address
        )
        selects0 = st.core.counters["selects"]

        async def one() -> None:
            client = router._get_client()
            assert client is not None
            assert await client.select([*range(1, 31)], 480, no_speculative_insert=True)
            assert st.core.metrics.fast_lane_connections._value.get() == 1
            await client.close()

        asyncio.run(one())
        assert st.core.counters["selects"] == selects0 + 1


def test_no_lane_unless_asked_and_never_with_tls(tmp_path: Path) -> None:
    from cluster.selector.server import _parse_args

    assert _parse_args([]).fast_lane_port is None
    assert _parse_args(["--fast-lane-port", "0"]).fast_lane_port == 0
    with ServerThread(_core()) as st:
        assert st.fast_lane_address is None
    pki = make_pki(tmp_path / "pki")
    tls = TLSSettings(cert_file=str(pki.cert_file), key_file=str(pki.key_file)).server()
    with ServerThread(_core(), tls=tls, fast_lane_port=0) as st:
        assert st.fast_lane_address is None  # NOTE: the lane is plaintext


def test_registry_publishes_fast_lanes() -> None:
    now = 1000.0
    values = [
        json.dumps({"address": "h:1", "t": now, "fast_lane": "h:11"}).encode(),
        json.dumps({"address": "h:2", "t": now}).encode(),  # serves none
        json.dumps({"address": "h:3", "t": now - 60, "fast_lane": "h:33"}).encode(),  # stale
        json.dumps(["not", "an", "entry"]).encode(),
        b"not json",
    ]
    assert parse_fast_lanes(values, now, max_age_s=5.0) == {"h:1": "h:11"}


def test_lone_selects_route_after_the_write_pipelined_ones_inline() -> None:
    clock = FakeClock()  # NOTE: frozen time: the scores' decay is the same on both cores
    with ServerThread(_core(clock), fast_lane_port=0) as st:
        _lone_and_pipelined(st, _core(clock))


def _lone_and_pipelined(st: ServerThread, twin: SelectorCore) -> None:
    """``twin`` routes every Select inline, in process."""
    reqs = [pb.SelectRequest(request_id=f"s{i}", block_hashes=[*range(1, 12 + i), 10**7 + i],
                             num_prompt_tokens=16 * (12 + i)) for i in range(12)]  # fmt: skip
    flushes: list[int] = []
    plain_flush = st.core.flush
    st.core.flush = lambda: (flushes.append(1), plain_flush())[1]  # type: ignore[method-assign]
    raw = _Raw(_lane_port(st))
    raw.send(frame(1, Kind.HELLO))
    assert raw.answer() == (1, Kind.OK, b"")
    for i, r in enumerate(reqs[:6]):  # NOTE: one at a time: each is its read's last
        raw.send(frame(10 + i, Kind.SELECT, r.SerializeToString()))
        assert raw.answer()[2] == twin.select_wire(r.SerializeToString()), i
        # NOTE: the server routes after writing the answer, so read the owed route unlocked
        _wait(lambda: st.core._deferred is None)
    assert len(flushes) == 6
    raw.send(
        b"".join(frame(20 + i, Kind.SELECT, r.SerializeToString()) for i, r in enumerate(reqs[6:]))
    )
    for r in reqs[6:]:
        assert raw.answer()[2] == twin.select_wire(r.SerializeToString())
    raw.close()
    _wait(lambda: st.core._deferred is None)
    pending = [(x.replica_id, x.num_pending_blocks) for x in st.core.list_replicas()]
    assert pending == [(x.replica_id, x.num_pending_blocks) for x in twin.list_replicas()]
    assert sum(n for _, n in pending) > 0 and set(st.core._routed) == set(twin._routed)
