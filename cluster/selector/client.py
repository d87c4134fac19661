"""Client helpers for the cache-selection service (router side and replica side).

- ``SelectorClient`` / ``AsyncSelectorClient``: ``select(...)`` with a deadline; returns None on
  timeout or outage (the router then falls back to power-of-two locally), raises ValueError on
  INVALID_ARGUMENT and PermissionError on UNAUTHENTICATED (caller bugs, not outages). The
  address may list several selection replicas (``"h1:p1,h2:p2"``): a Select goes to one and,
  within the same deadline, fails over to the next when it is down, slow (each attempt gets
  its share of the time left) or knows none of the candidates (restarted, not yet resynced).
  ``AsyncSelectorClient(..., fast_lanes={grpc address: lane address})`` sends Select over a
  replica's fast lane (``cluster.selector.fast_lane``) when it publishes one: same answers and
  errors; when the lane cannot be reached (refused, reset, or no connection within half the
  attempt's time) the call goes to that replica's gRPC within the same attempt, and the lane
  is left alone for ``LANE_RETRY_S``, doubling per failure in a row up to ``LANE_RETRY_MAX_S``.
- ``KVReporter``: a replica's ReportKV streamer on a background thread. ``publish(events)``
  numbers and sends kvmanager events, ``snapshot(load)`` sends load; every (re)connect sends
  Hello + a full resync built from ``resident_hashes()`` (the pool's cached block hashes), and
  so does a service-requested resync after a sequence gap. While disconnected, events are
  dropped: the resync on reconnect covers them. ``outcome(o)`` sends a realised outcome (the
  reward signal) on the same stream, in order with the events: at most
  ``MAX_QUEUED_OUTCOMES`` wait at a time, and while disconnected outcomes are dropped for good
  (no resync carries them; a learning signal, not state).

Every client takes ``tls`` (``cluster.selector.grpc_tls.ClientTLS``): None dials plaintext.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError

from cluster.selector.convert import events_to_proto, load_to_proto, outcome_to_proto
from cluster.selector.core_types import Selection
from cluster.selector.fast_lane_client import FastLaneClient
from cluster.selector.fast_lane_frames import FastLaneError, Kind
from cluster.selector.grpc_tls import ClientTLS, aio_channel, channel
from cluster.selector.types import LoadSnapshot, Outcome, Ranked, ScoreTerms
from kvmanager.events import KVEvent
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc

log = logging.getLogger("tinyserve.selector_client")
_OUTAGE = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}
_RESYNC_CHUNK = 65536
# NOTE: after a fast lane connection failure its replica is asked over gRPC this long before
# the lane is tried again (a dead lane costs one refused connect per period, not per call).
LANE_RETRY_S = 1.0
LANE_RETRY_MAX_S = 30.0
# NOTE: outcomes waiting on one ReportKV stream; past it an outcome is dropped (never blocks,
# and a stalled stream holds at most this many outcomes ahead of the KV events behind them).
MAX_QUEUED_OUTCOMES = 1024


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _request(block_hashes: Sequence[int], num_prompt_tokens: int, **kw: Any) -> pb.SelectRequest:
    return pb.SelectRequest(block_hashes=block_hashes, num_prompt_tokens=num_prompt_tokens, **kw)


def selection_from_proto(resp: pb.SelectResponse) -> Selection:
    ranked = []
    for r in resp.replicas:
        terms = ScoreTerms(
            **{f.name: getattr(r.terms, f.name) for f in pb.ScoreTerms.DESCRIPTOR.fields}
        )
        ranked.append(Ranked(r.replica_id, r.score, terms))
    return Selection(resp.policy, ranked, resp.num_prompt_blocks, resp.num_unknown_replicas)


def _handle(err: grpc.RpcError) -> None:
    code = err.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise ValueError(err.details()) from err
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise PermissionError(err.details()) from err
    if code not in _OUTAGE:
        raise err
    log.debug("selector call failed: %s", code)


def split_addresses(address: str) -> list[str]:
    """``"h1:p1,h2:p2"`` -> ``["h1:p1", "h2:p2"]`` (one selection replica per entry)."""
    out = [a.strip() for a in address.split(",") if a.strip()]
    if not out:
        raise ValueError("no selection service address given")
    return out


def _unsynced(sel: Selection) -> bool:
    """An answer from a replica that knows none of the named candidates (just restarted,
    replicas not yet resynced): another replica may know better."""
    return not sel.ranked and sel.num_unknown_replicas > 0


class _Failover:
    """Order in which to try a client's endpoints: a random primary (so many routers spread
    over the selection replicas), the others after it; an endpoint that just failed is tried
    last for ``penalty_s``."""

    def __init__(self, num: int, penalty_s: float = 1.0) -> None:
        self._num = num
        self._primary = random.randrange(num)
        self._down_until = [0.0] * num
        self._penalty_s = penalty_s

    def order(self) -> list[int]:
        now = time.monotonic()
        ring = [(self._primary + k) % self._num for k in range(self._num)]
        return sorted(ring, key=lambda i: self._down_until[i] > now)  # NOTE: stable

    def failed(self, i: int) -> None:
        self._down_until[i] = time.monotonic() + self._penalty_s

    def attempts(self, timeout_s: float) -> Iterator[tuple[int, float]]:
        """(endpoint, its timeout) in failover order, all within one deadline of ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        order = self.order()
        for k, i in enumerate(order):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # NOTE: a hung replica may take only its share of what is left of the deadline.
            yield i, left / (len(order) - k)

    def error(self, err: grpc.RpcError, i: int) -> None:
        """An RPC to endpoint ``i`` failed: re-raise what is no outage, else try it last."""
        _handle(err)
        self.failed(i)


Ch = TypeVar("Ch", grpc.Channel, grpc.aio.Channel)


class _Replicas(Generic[Ch]):
    """What both clients hold: a channel and a stub per selection replica, the token's
    metadata, the default Select deadline and the failover state."""

    def __init__(self, channels: list[Ch], token: str | None, timeout_s: float) -> None:
        self.channels = channels
        self.stubs = [pb_grpc.CacheSelectionStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
        self.channel, self.stub = channels[0], self.stubs[0]
        self._md = _metadata(token)
        self.timeout_s = timeout_s
        self._failover = _Failover(len(self.stubs))


class SelectorClient(_Replicas[grpc.Channel]):
    """Synchronous client. ``address`` may list several selection replicas (comma-separated):
    ``select`` fails over between them within one deadline. ``timeout_s`` is the default
    Select deadline."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        timeout_s: float = 0.05,
        tls: ClientTLS | None = None,
    ) -> None:
        super().__init__([channel(a, tls) for a in split_addresses(address)], token, timeout_s)

    def select(
        self,
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        timeout_s: float | None = None,
        **kw: object,
    ) -> Selection | None:
        """Rank replicas; ``kw`` are SelectRequest fields (candidate_replica_ids, policy, ...).
        None when no selection replica answered within the deadline."""
        msg = _request(block_hashes, num_prompt_tokens, **kw)
        fallback: Selection | None = None
        for i, timeout in self._failover.attempts(timeout_s or self.timeout_s):
            try:
                resp = self.stubs[i].Select(msg, timeout=timeout, metadata=self._md)
            except grpc.RpcError as err:
                self._failover.error(err, i)
                continue
            sel = selection_from_proto(resp)
            if not _unsynced(sel):
                return sel
            fallback = fallback or sel
            self._failover.failed(i)
        return fallback

    def feedback(self, outcome: Outcome, timeout_s: float = 1.0) -> bool:
        """Report a realised outcome to every selection replica (each keeps its own reward
        history); True when one accepted it."""
        msg = outcome_to_proto(outcome)
        accepted = False
        for stub in self.stubs:
            try:
                accepted |= bool(stub.Feedback(msg, timeout=timeout_s, metadata=self._md).accepted)
            except grpc.RpcError as err:
                _handle(err)
        return accepted

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


def _lane_error(exc: FastLaneError) -> None:
    """An error frame: re-raise what is no outage as gRPC's codes are (``_handle``)."""
    if exc.kind == Kind.UNAUTHENTICATED:
        raise PermissionError(exc.message) from exc
    if exc.kind in (Kind.INVALID_ARGUMENT, Kind.TOO_LARGE):
        raise ValueError(exc.message) from exc
    log.debug("selector fast lane call failed: %s", exc)


class AsyncSelectorClient(_Replicas[grpc.aio.Channel]):
    """asyncio client (for the Serve request router); fails over like ``SelectorClient``.
    ``fast_lanes`` maps entries of ``address`` to their fast lane's ``host:port`` (module
    docstring); TLS clients never use one (the lane is plaintext)."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        timeout_s: float = 0.05,
        tls: ClientTLS | None = None,
        fast_lanes: Mapping[str, str] | None = None,
    ) -> None:
        addresses = split_addresses(address)
        super().__init__([aio_channel(a, tls) for a in addresses], token, timeout_s)
        lanes = fast_lanes if tls is None and fast_lanes else {}
        self.lanes = [
            FastLaneClient(lanes[a], token) if lanes.get(a) else None for a in addresses
        ]
        self._lane_down_until = [0.0] * len(addresses)
        self._lane_failures = [0] * len(addresses)

    async def _lane_select(self, i: int, raw: bytes, timeout: float) -> pb.SelectResponse | None:
        """Select over endpoint ``i``'s fast lane: the answer, or None when the lane cannot
        be reached (then gRPC is asked). TimeoutError / FastLaneError as for any call."""
        lane = self.lanes[i]
        if lane is None or time.monotonic() < self._lane_down_until[i]:
            return None
        t0 = time.monotonic()
        try:
            # NOTE: a lane that does not connect (a firewall dropping its port) may cost half
            # the attempt; the rest is gRPC's.
            await lane.connect(timeout / 2)
            body = await lane.call(Kind.SELECT, raw, timeout - (time.monotonic() - t0))
        except (TimeoutError, asyncio.TimeoutError):  # NOTE: FastLaneError propagates
            if lane.connected:
                raise  # NOTE: the call, not the connect, timed out: as gRPC's deadline
            self._lane_down(i, TimeoutError("connect timed out"))
            return None
        except OSError as exc:  # NOTE: ConnectionError too: refused, reset, closed
            self._lane_down(i, exc)
            return None
        self._lane_failures[i] = 0
        try:
            return pb.SelectResponse.FromString(body)
        except DecodeError as exc:  # NOTE: as gRPC's INTERNAL: an outage of this replica
            raise FastLaneError(Kind.INTERNAL, f"undecodable answer: {exc}") from exc

    def _lane_down(self, i: int, exc: BaseException) -> None:
        lane = self.lanes[i]
        n = self._lane_failures[i] = self._lane_failures[i] + 1
        wait = min(LANE_RETRY_S * 2 ** (n - 1), LANE_RETRY_MAX_S)
        log.info("selector fast lane %s unreachable (%r): gRPC for %.0f s",
                 lane.address if lane else "?", exc, wait)  # fmt: skip
        self._lane_down_until[i] = time.monotonic() + wait

    async def select(
        self,
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        timeout_s: float | None = None,
        **kw: object,
    ) -> Selection | None:
        msg = _request(block_hashes, num_prompt_tokens, **kw)
        raw = msg.SerializeToString() if any(self.lanes) else b""
        fallback: Selection | None = None
        for i, timeout in self._failover.attempts(timeout_s or self.timeout_s):
            t0 = time.monotonic()
            try:
                resp = await self._lane_select(i, raw, timeout)
            except FastLaneError as exc:
                _lane_error(exc)
                self._failover.failed(i)
                continue
            except (TimeoutError, asyncio.TimeoutError):
                self._failover.failed(i)  # NOTE: as gRPC's DEADLINE_EXCEEDED
                continue
            try:
                if resp is None:
                    left = timeout - (time.monotonic() - t0)
                    if left <= 0:
                        self._failover.failed(i)
                        continue
                    resp = await self.stubs[i].Select(msg, timeout=left, metadata=self._md)
            except grpc.RpcError as err:
                self._failover.error(err, i)
                continue
            sel = selection_from_proto(resp)
            if not _unsynced(sel):
                return sel
            fallback = fallback or sel
            self._failover.failed(i)
        return fallback

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        for lane in self.lanes:
            if lane is not None:
                await lane.close()


class KVReporter:
    """ReportKV streamer for one replica (see the module docstring). Thread-safe publish."""

    def __init__(
        self,
        address: str,
        replica_id: str,
        resident_hashes: Callable[[], Iterable[int]] = lambda: (),
        hello: pb.ReplicaHello | None = None,
        token: str | None = None,
        heartbeat_s: float = 1.0,
        retry_s: float = 0.2,
        tls: ClientTLS | None = None,
        max_outcomes: int = MAX_QUEUED_OUTCOMES,
    ) -> None:
        self.address = address
        self._tls = tls
        self.replica_id = replica_id
        self._resident = resident_hashes
        self._hello = hello or pb.ReplicaHello()
        self._md = _metadata(token)
        self._heartbeat_s = heartbeat_s
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._seq = 0
        self._queue: queue.Queue[pb.ReportKVRequest] | None = None
        self._max_outcomes = max_outcomes
        self._num_outcomes = 0  # outcomes in self._queue, not yet handed to gRPC
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"kv-reporter-{replica_id}", daemon=True
        )
        self.num_connects = 0
        self.num_resyncs_requested = 0
        self.num_outcomes_dropped = 0
        self.connected = threading.Event()

    def start(self) -> KVReporter:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def publish(self, events: Sequence[KVEvent]) -> int | None:
        """Send one batch; returns its seq, or None while disconnected (dropped: the next resync
        carries the state)."""
        with self._lock:
            if self._queue is None or not events:
                return None
            self._seq += 1
            batch = events_to_proto(self._seq, list(events), time.time())
            self._queue.put(pb.ReportKVRequest(replica_id=self.replica_id, batch=batch))
            return self._seq

    def snapshot(self, load: LoadSnapshot) -> bool:
        with self._lock:
            if self._queue is None:
                return False
            self._queue.put(
                pb.ReportKVRequest(replica_id=self.replica_id, snapshot=load_to_proto(load))
            )
            return True

    def outcome(self, outcome: Outcome) -> bool:
        """Queue a realised outcome behind what this stream already holds, so the service
        applies it after the events published before it (as the unary Feedback, through the
        same core method). Never blocks. False (counted in ``num_outcomes_dropped``) when it is
        dropped: while disconnected, from the service or between two connections (like a
        failed unary Feedback; a reconnect resends the KV state, not outcomes), or when
        ``max_outcomes`` already wait in the queue. True means queued, not delivered: a
        connection (or connection attempt) that ends first loses it, uncounted."""
        with self._lock:
            if self._queue is None or self._num_outcomes >= self._max_outcomes:
                self.num_outcomes_dropped += 1
                return False
            self._num_outcomes += 1
            msg = pb.ReportKVRequest(replica_id=self.replica_id, feedback=outcome_to_proto(outcome))
            self._queue.put(msg)
            return True

    def _open(self) -> queue.Queue[pb.ReportKVRequest]:
        """New per-connection queue, pre-filled with Hello + the full resync (atomically with
        respect to publish, so no batch falls between the resync and the next seq)."""
        q: queue.Queue[pb.ReportKVRequest] = queue.Queue()
        with self._lock:
            q.put(pb.ReportKVRequest(replica_id=self.replica_id, hello=self._hello))
            hashes = list(self._resident())
            chunks = [
                hashes[i : i + _RESYNC_CHUNK] for i in range(0, len(hashes), _RESYNC_CHUNK)
            ] or [[]]
            for i, chunk in enumerate(chunks):
                resync = pb.KVResync(seq=self._seq, block_hashes=chunk, done=i == len(chunks) - 1)
                q.put(pb.ReportKVRequest(replica_id=self.replica_id, resync=resync))
            self._queue = q
            self._num_outcomes = 0  # NOTE: the old queue's outcomes went with it
        return q

    def _messages(
        self, q: queue.Queue[pb.ReportKVRequest], closed: threading.Event
    ) -> Iterator[pb.ReportKVRequest]:
        while not closed.is_set():
            try:
                msg = q.get(timeout=self._heartbeat_s)
            except queue.Empty:
                yield pb.ReportKVRequest(replica_id=self.replica_id, hello=self._hello)  # heartbeat
                continue
            if msg.HasField("feedback"):
                with self._lock:
                    if self._queue is q:  # NOTE: a new connection counts its own queue
                        self._num_outcomes -= 1
            yield msg

    def _run(self) -> None:
        stub = pb_grpc.CacheSelectionStub(channel(self.address, self._tls))  # type: ignore[no-untyped-call]
        while not self._stop.is_set():
            closed = threading.Event()
            q = self._open()
            self.num_connects += 1
            self.connected.set()
            call = stub.ReportKV.future(self._messages(q, closed), metadata=self._md)
            while not self._stop.is_set() and not call.done():
                time.sleep(0.02)
            closed.set()
            with self._lock:
                self._queue = None
            self.connected.clear()
            if self._stop.is_set():
                call.cancel()
                return
            try:
                if call.result().resync_required:
                    self.num_resyncs_requested += 1
                    continue  # reconnect at once with a resync
            except grpc.RpcError as err:
                log.info("ReportKV for %s ended: %s; retrying", self.replica_id, err.code())
            self._stop.wait(self._retry_s)
