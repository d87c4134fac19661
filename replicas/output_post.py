"""A request's outputs from a replica to its ingress over a Unix socket, not as Ray items.

Why: every item of a Ray streaming generator is a round trip between the two core workers;
measured on the 2-core CPU box (plain Ray, no Serve, 3,000 small items): ~460-520 us of the
caller's CPU and ~300 us of the actor's per item, against ~10 us in all over a Unix socket.
On the served path that was most of the ingress's ~1.0 ms and the replica's ~0.7 ms of CPU per
streamed chunk (benchmarks/results/serve_overhead_notes.md, "Outputs over a Unix socket").

The contract:
- The ingress (``cluster.serve.output_inbox.OutputInbox``) listens on a socket in a private
  directory (0700) and names it in the request (``ReplyTo``: node id, path, token).
- The replica (``OutputPost``) posts the request's outputs there (every delta of a streamed
  one, the one folded output per sequence of a non-streamed one) when it runs on the same
  node, and then yields nothing through Ray; the Serve call still carries the request,
  its end, its errors and its cancellation. Otherwise it yields them as Ray items (the
  ingress takes both).
- One connection per (replica, inbox), shared by requests; it opens with the token. A frame
  is ``u32 length`` + a pickle of ``(request_id, RequestOutput)``. NOTE: pickle is safe here
  because only this uid can reach the socket and only a peer that knows the token is read.
- Frames of one request arrive in the order they were posted (one connection, one writer
  loop); a request is complete when every sequence's finished output has arrived.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from replicas.outputs import RequestOutput

log = logging.getLogger("ray.serve")
HEADER = struct.Struct("<I")
MAX_FRAME = 64 << 20  # NOTE: a sanity bound on one frame (a whole non-streamed text fits)
HIGH_WATER = 1 << 20  # NOTE: drain the connection when this much is buffered


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where a request's outputs may be posted: the ingress's node, socket path and token."""

    node_id: str
    path: str
    token: str

    def encode(self) -> str:
        return f"{self.node_id}|{self.path}|{self.token}"

    @classmethod
    def decode(cls, s: str) -> ReplyTo | None:
        """None for "" (the ingress asked for Ray items) or a malformed value."""
        parts = s.split("|")
        if len(parts) != 3 or not all(parts):
            return None
        return cls(*parts)


def frame(request_id: str, out: RequestOutput) -> bytes:
    body = pickle.dumps((request_id, out), protocol=5)
    return HEADER.pack(len(body)) + body


def hello(token: str) -> bytes:
    body = token.encode()
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One frame's body; ConnectionError for a size past ``MAX_FRAME``."""
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"a frame of {n} bytes exceeds {MAX_FRAME}")
    return await reader.readexactly(n)


async def serve_frames(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str,
                       on_frame: Callable[[bytes], None], what: str) -> None:
    """A server's side of one connection: the peer's hello checked against ``token``, then
    each frame's body handed to ``on_frame``. Ends (and closes) on a wrong token, the peer's
    end, an oversized frame or an error of ``on_frame`` (logged, naming ``what``)."""
    try:
        if not hmac.compare_digest(await read_frame(reader), token.encode()):
            log.warning("%s: a peer without the token was refused", what)
            return
        while True:
            on_frame(await read_frame(reader))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # NOTE: the peer went away
    except Exception as exc:  # NOTE: a bad frame ends this connection, not the server
        log.warning("%s: connection dropped: %r", what, exc)
    finally:
        writer.close()


class OutputPost:
    """This replica's connections to the inboxes of its node (one per inbox, opened on the
    first request that names it; a broken one is reopened by the next request)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._conns: dict[str, asyncio.StreamWriter] = {}
        self._opening: dict[str, asyncio.Future[asyncio.StreamWriter]] = {}

    def accepts(self, reply_to: ReplyTo | None) -> bool:
        """Post to ``reply_to``? Only on this node, and only while its socket exists."""
        return (
            reply_to is not None
            and bool(self.node_id)
            and reply_to.node_id == self.node_id
            and Path(reply_to.path).is_socket()
        )

    async def connection(self, reply_to: ReplyTo) -> asyncio.StreamWriter:
        """The open connection to ``reply_to``'s inbox (opened once, shared)."""
        w = self._conns.get(reply_to.path)
        if w is not None and not w.is_closing():
            return w
        pending = self._opening.get(reply_to.path)
        if pending is None:
            pending = asyncio.ensure_future(self._open(reply_to))
            self._opening[reply_to.path] = pending
            pending.add_done_callback(lambda _: self._opening.pop(reply_to.path, None))
        return await asyncio.shield(pending)

    async def _open(self, reply_to: ReplyTo) -> asyncio.StreamWriter:
        _, w = await asyncio.open_unix_connection(reply_to.path)
        w.write(hello(reply_to.token))
        self._conns[reply_to.path] = w
        return w

    @staticmethod
    async def send(w: asyncio.StreamWriter, request_id: str, out: RequestOutput) -> None:
        """Post one output; ConnectionError when the inbox has gone (its ingress died)."""
        if w.is_closing():
            raise ConnectionResetError("the ingress's output inbox closed")
        w.write(frame(request_id, out))
        if w.transport.get_write_buffer_size() > HIGH_WATER:
            await w.drain()

    def close(self) -> None:
        for w in self._conns.values():
            w.close()
        self._conns.clear()
