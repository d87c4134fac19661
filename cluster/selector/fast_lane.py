"""The Select fast lane: Select (and Ping) over a persistent TCP connection with
length-prefixed frames (``cluster.selector.fast_lane_frames``), beside the gRPC port.

NOTE: why a second front end for one method: Python gRPC spends ~170-270 us of server CPU on
an EMPTY unary call (benchmarks/README.md, "Selection service at fleet scale"), more than
the Select's own compute (~70-150 us); it, not the ranking, capped one selection process near
2,300-2,900 Select/s. Here a call costs a header unpack, the Select on the wire bytes
(``SelectorCore.select_wire``, the same bytes gRPC carries) and one write per batch of answers:
``benchmarks/selector_rpc.py --front-ends aio-wire raw-wire`` measures the difference. Every
other method (ReportKV, Feedback, Stats, ...) stays gRPC only.

Contract: ``start_fast_lane(core, host, port, token)`` in a running loop serves until its
``close()``. Calls on one connection are answered in order, each with its call id (clients
pipeline many). Auth: the connection's first frame is HELLO with the shared token (checked
as the gRPC interceptor does, constant-time); anything else first, or a wrong token, is
answered UNAUTHENTICATED and the connection closed. Bad Select bytes: INVALID_ARGUMENT for
that call only (counted as the gRPC servicer counts them, ``errors_total{kind=...}``). An
oversized frame: TOO_LARGE, connection closed. No input stops the server. Plaintext only:
with TLS configured the service does not open a fast lane (its clients use gRPC).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from dataclasses import dataclass
from typing import cast

from cluster.selector import wire
from cluster.selector.core import SelectorCore
from cluster.selector.fast_lane_frames import HEADER, MAX_FRAME_BYTES, Kind, frame
from cluster.selector.wire import MalformedMessage

log = logging.getLogger("tinyserve.selector.fast_lane")
_HEAD = HEADER.size
_OK = int(Kind.OK)
# NOTE: answers of one read go out together (one syscall), but at most this many: a read of
# many pipelined Selects must not hold its first answers back for the whole batch
_FLUSH_EVERY = 8
_MAX_HELLO_BYTES = 4096  # NOTE: a token, not a payload: bounds what an unknown peer can send


class _Connection(asyncio.Protocol):
    """One client connection: frames in, answers out (one write per ``data_received``, or
    per ``_FLUSH_EVERY`` answers)."""

    def __init__(
        self, core: SelectorCore, expected: bytes | None, live: set[asyncio.Transport]
    ) -> None:
        self._core = core
        self._live = live
        self._expected = expected  # NOTE: the token's bytes; None = no auth configured
        self._authed = False
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # NOTE: cast, not isinstance: uvloop's transports do not subclass asyncio's
        self._transport = transport = cast(asyncio.Transport, transport)
        self._live.add(transport)
        self._core.metrics.fast_lane_connections.inc()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # NOTE: answers are small and latency-bound: never wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._live.discard(self._transport)
            self._core.metrics.fast_lane_connections.dec()
        self._transport = None

    # NOTE: flow control: a client that stops reading its answers stops being read, so its
    # answers cannot pile up in the server's memory.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        close = owed = False
        while end - pos >= _HEAD:
            length, call_id, kind = HEADER.unpack_from(buf, pos)
            if length > MAX_FRAME_BYTES:
                out.append(self._error(call_id, Kind.TOO_LARGE, "invalid_argument",
                                       f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}"))  # fmt: skip
                close = True
                break
            if not self._authed and self._expected is not None and (
                kind != Kind.HELLO or length > _MAX_HELLO_BYTES
            ):
                # NOTE: refused on the header: an unauthenticated peer gets no payload buffered
                out.append(self._error(call_id, Kind.UNAUTHENTICATED, "unauthenticated",
                                       "the connection must open with HELLO and the token"))  # fmt: skip
                close = True
                break
            if end - pos - _HEAD < length:
                break
            payload = bytes(buf[pos + _HEAD : pos + _HEAD + length])
            pos += _HEAD + length
            # NOTE: the read's last Select answers first and routes after the write (a lone
            # request waits for its answer only: benchmarks/README.md, "Ninth pass"); one
            # with more behind it routes inline (cheaper: pipelined clients want throughput)
            last = kind == Kind.SELECT and end - pos < _HEAD
            answer, close = self._call(call_id, kind, payload, last)
            owed |= last
            out.append(answer)
            if close:
                break
            if len(out) >= _FLUSH_EVERY and self._transport is not None:
                self._transport.write(b"".join(out))
                out.clear()
        del buf[:pos]
        t = self._transport
        if t is None:
            return
        if out:
            t.write(b"".join(out) if len(out) > 1 else out[0])
        if owed:
            self._core.flush()
        if close:
            t.close()

    def _call(
        self, call_id: int, kind: int, payload: bytes, defer: bool = False
    ) -> tuple[bytes, bool]:
        """One call's answer frame, and whether to close the connection after it; a Select
        with ``defer`` leaves its route owed (``SelectorCore.select_wire``)."""
        if kind == Kind.SELECT:
            return self._select(call_id, payload, defer), False
        if kind == Kind.PING:
            return frame(call_id, _OK), False
        if kind == Kind.HELLO:
            if self._expected is None or hmac.compare_digest(payload, self._expected):
                self._authed = True
                return frame(call_id, _OK), False
            return self._error(call_id, Kind.UNAUTHENTICATED, "unauthenticated",
                               "wrong authorization token"), True  # fmt: skip
        return self._error(call_id, Kind.INVALID_ARGUMENT, "invalid_argument",
                           f"unknown frame kind {kind}"), False  # fmt: skip

    def _select(self, call_id: int, raw: bytes, defer: bool) -> bytes:
        try:
            body = self._core.select_wire(raw, defer)
        except MalformedMessage as exc:
            return self._error(call_id, Kind.INVALID_ARGUMENT, "malformed",
                               f"malformed message: {exc}")  # fmt: skip
        except ValueError as exc:
            return self._error(call_id, Kind.INVALID_ARGUMENT, "invalid_argument", str(exc))
        except Exception:  # NOTE: a core bug fails this call, never the connection's others
            log.exception("fast lane Select failed")
            return self._error(call_id, Kind.INTERNAL, "internal", "internal error")
        return HEADER.pack(len(body), call_id, _OK) + body

    def _error(self, call_id: int, kind: Kind, counter: str, message: str) -> bytes:
        self._core.metrics.errors.labels(counter).inc()
        return frame(call_id, kind, message.encode())


@dataclass(slots=True)
class FastLane:
    """A serving fast lane (``start_fast_lane``); the caller owns ``close()``."""

    server: asyncio.Server
    port: int
    _live: set[asyncio.Transport]

    async def close(self) -> None:
        """Stop listening and drop every open connection (their clients fall back)."""
        self.server.close()
        for t in list(self._live):
            t.abort()
        self._live.clear()


async def start_fast_lane(
    core: SelectorCore, host: str = "127.0.0.1", port: int = 0, token: str | None = None
) -> FastLane:
    """Serve Select frames for ``core`` on ``host:port`` (0 = a free port) in the running
    loop. OSError when the port cannot be bound."""
    wire.warm_up()
    expected = token.encode() if token else None
    live: set[asyncio.Transport] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: _Connection(core, expected, live), host, port, reuse_address=True
    )
    bound = int(server.sockets[0].getsockname()[1])
    return FastLane(server, bound, live)
