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
- A replica's ReportKV streamer is ``cluster.selector.reporter.KVReporter``.

Every client takes ``tls`` (``cluster.selector.grpc_tls.ClientTLS``): None dials plaintext.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError

from cluster.selector.convert import outcome_to_proto
from cluster.selector.core_types import Selection
from cluster.selector.fast_lane_client import FastLaneClient
from cluster.selector.fast_lane_frames import FastLaneError, Kind
from cluster.selector.grpc_tls import ClientTLS, aio_channel, channel
from cluster.selector.types import Outcome, Ranked, ScoreTerms
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
# NOTE: after a fast lane connection failure its replica is asked over gRPC this long before
# the lane is tried again (a dead lane costs one refused connect per period, not per call).
LANE_RETRY_S = 1.0
LANE_RETRY_MAX_S = 30.0


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
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
        self._md = auth_metadata(token)
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
