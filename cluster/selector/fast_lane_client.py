"""asyncio client of the Select fast lane (``cluster.selector.fast_lane``): one persistent
connection, many calls in flight on it (each frame carries its call id).

Contract: ``await FastLaneClient(address, token).call(kind, payload, timeout_s)`` returns the
answer's payload. It connects (and authenticates) on first use, within that call's timeout.
Raises ``FastLaneError`` for an error frame (the server refused this call: bad input, wrong
token), ``TimeoutError`` past the timeout, ``ConnectionError`` / ``OSError`` when the
connection cannot be opened or breaks (every call in flight on it fails at once; the next
call reconnects). Bound to the loop it is first used on, like a grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from cluster.selector.fast_lane_frames import (
    ERROR_KINDS,
    HEADER,
    MAX_CALL_ID,
    FastLaneError,
    Kind,
    frame,
)

_HEAD = HEADER.size
Answer = tuple[int, bytes]


def _expire(fut: asyncio.Future[Answer]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("fast lane call timed out"))


class _Link(asyncio.Protocol):
    """The client side of one connection: matches answer frames to waiting calls by id."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[Answer]] = {}
        self.lost: BaseException | None = None
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # NOTE: cast, not isinstance: uvloop's transports do not subclass asyncio's
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= _HEAD:
            length, call_id, kind = HEADER.unpack_from(buf, pos)
            if end - pos - _HEAD < length:
                break
            payload = bytes(buf[pos + _HEAD : pos + _HEAD + length])
            pos += _HEAD + length
            fut = self.pending.pop(call_id, None)
            if fut is not None and not fut.done():  # NOTE: done = it timed out meanwhile
                fut.set_result((kind, payload))
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("fast lane connection closed")
        self.transport = None
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError(f"fast lane connection lost: {self.lost}"))
        self.pending.clear()


class FastLaneClient:
    """One fast lane connection to ``address`` ("host:port"); see the module docstring."""

    def __init__(self, address: str, token: str | None = None) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"fast lane address must be host:port, got {address!r}")
        self.address = address
        self._host, self._port = host.strip("[]"), int(port)
        self._hello = (token or "").encode()
        self._link: _Link | None = None
        self._connecting: asyncio.Future[_Link] | None = None
        self._next_id = 0

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.transport is not None

    async def connect(self, timeout_s: float) -> None:
        """Open and authenticate the connection now, unless it is open (TimeoutError,
        OSError or FastLaneError as ``call``)."""
        if not self.connected:
            await asyncio.wait_for(self._connect(), timeout_s)

    async def call(self, kind: int, payload: bytes, timeout_s: float) -> bytes:
        """One call's answer payload (raises as the module docstring says)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        link = self._link
        if link is None or link.transport is None:
            link = await asyncio.wait_for(self._connect(), timeout_s)
        return await self._send(link, kind, payload, deadline - loop.time())

    async def _send(self, link: _Link, kind: int, payload: bytes, timeout_s: float) -> bytes:
        transport = link.transport
        if transport is None:
            raise ConnectionResetError(f"fast lane connection lost: {link.lost}")
        loop = asyncio.get_running_loop()
        self._next_id = call_id = (self._next_id + 1) & MAX_CALL_ID
        fut: asyncio.Future[Answer] = loop.create_future()
        link.pending[call_id] = fut
        transport.write(frame(call_id, kind, payload))
        timer = loop.call_later(max(timeout_s, 0.0), _expire, fut)
        try:
            got, body = await fut
        finally:
            timer.cancel()
            link.pending.pop(call_id, None)
        if got in ERROR_KINDS:
            raise FastLaneError(got, body.decode(errors="replace"))
        if got != Kind.OK:
            raise ConnectionError(f"fast lane answered unknown frame kind {got}")
        return body

    async def _connect(self) -> _Link:
        """Open and authenticate the connection; concurrent callers share one attempt."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            # NOTE: its error is read even when every waiter gave up (no "never retrieved")
            self._connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
        fut = self._connecting
        try:
            # NOTE: shielded: one caller's timeout must not cancel the others' connect
            return await asyncio.shield(fut)
        finally:
            if fut.done() and self._connecting is fut:
                self._connecting = None

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(_Link, self._host, self._port)
        try:
            await self._send(link, Kind.HELLO, self._hello, 10.0)
        except BaseException:
            if link.transport is not None:
                link.transport.close()
            raise
        self._link = link
        return link

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            link.transport.close()
