"""The ingress's end of ``replicas.output_post``: a Unix-socket server on the ingress's loop
that receives replicas' outputs for its requests and hands each to its request's
queue. Frames for a request that is not open (finished, cancelled) are dropped.

    inbox = OutputInbox(node_id)
    await inbox.start()                      # once, on the loop that reads the queues
    q = inbox.open(request_id)               # before the request is sent
    ... GenerateRequest(..., reply_to=inbox.reply_to.encode()) ...
    out = await q.get()                      # RequestOutput, in the order posted
    inbox.close(request_id)
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from replicas.output_post import ReplyTo, serve_frames
from replicas.outputs import RequestOutput

log = logging.getLogger("ray.serve")


class OutputInbox:
    """One per ingress replica; ``reply_to`` is what its requests name."""

    def __init__(self, node_id: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="tinyserve-inbox-"))
        os.chmod(self._dir, 0o700)  # NOTE: only this uid can reach the socket
        self.reply_to = ReplyTo(node_id, str(self._dir / "s"), secrets.token_hex(16))
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._server: asyncio.Future[asyncio.Server] | None = None
        self.num_frames = 0
        self.num_dropped = 0

    async def start(self) -> None:
        """Listen (idempotent, also when requests race to start it); call on the loop that
        reads the queues."""
        server = self._server
        if server is None:
            server = self._server = asyncio.ensure_future(
                asyncio.start_unix_server(self._serve, self.reply_to.path))
        await asyncio.shield(server)

    def open(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = q
        return q

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # NOTE: a replica that went away: its Serve call reports why
        await serve_frames(reader, writer, self.reply_to.token, self._on_frame, "output inbox")

    def _on_frame(self, body: bytes) -> None:
        request_id, out = pickle.loads(body)
        q = self._queues.get(request_id)
        self.num_frames += 1
        if q is None:
            self.num_dropped += 1
        else:
            q.put_nowait(out)

    def shutdown(self) -> None:
        if self._server is not None and self._server.done() and not self._server.exception():
            self._server.result().close()
        shutil.rmtree(self._dir, ignore_errors=True)


class _End:
    """The Serve call's stream ended (``exc`` None) or failed."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc


async def merge_posted(
    items: AsyncIterator[RequestOutput],
    posted: asyncio.Queue[Any],
    n: int,
    grace_s: float = 30.0,
) -> AsyncIterator[RequestOutput]:
    """One request's outputs from both paths: ``items`` (the Serve call's stream: Ray items
    of a replica that did not post, then its end or its error) and ``posted`` (the inbox's
    queue of it), in arrival order. Ends once the call has ended and every one of the ``n``
    sequences' finished outputs has arrived; raises the call's error as soon as it comes.
    RuntimeError when the call ended but a sequence's last output did not arrive within
    ``grace_s`` (outputs lost: never silently a truncated answer).
    NOTE: on the call's error, outputs still in the socket are not waited for: the stream
    ends with an error event either way."""

    async def pump() -> None:
        try:
            async for out in items:
                posted.put_nowait(out)
            posted.put_nowait(_End(None))
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # NOTE: the reader is done with this request
            posted.put_nowait(_End(exc))  # NOTE: the call itself was cancelled: the reader's error
            raise
        except BaseException as exc:  # NOTE: handed to the reader, raised there
            posted.put_nowait(_End(exc))

    task = asyncio.ensure_future(pump())
    finished, ended = 0, False
    try:
        while not (ended and finished >= n):
            if ended:
                try:
                    x = await asyncio.wait_for(posted.get(), grace_s)
                except TimeoutError:
                    raise RuntimeError(
                        f"the replica ended the request but {n - finished} of its {n} "
                        "sequences' last outputs never arrived"
                    ) from None
            else:
                x = await posted.get()
            if isinstance(x, _End):
                if x.exc is not None:
                    raise x.exc
                ended = True
                continue
            finished += bool(x.finished)
            yield x
    finally:
        task.cancel()
