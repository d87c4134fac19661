"""The router's half of ``replicas.early_start``: the request written to the chosen replica's
socket before Serve's call for it leaves, so the engine starts ~a handle hop sooner.

    sender = EarlySender(this_node_id())
    sender.send(replica.routing_stats, request)   # in choose_replicas, on the router's loop

``send`` never waits and never raises: a replica on another node or without an address, a
request whose outputs are not posted to an inbox, or a connection not open yet (the first
request to a replica opens it in the background) is simply not sent early; Serve's call then
runs it the usual way. A broken connection is dropped and reopened by a later request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from replicas.early_start import ROUTING_STATS_KEY, frame
from replicas.output_post import HIGH_WATER, ReplyTo, hello

log = logging.getLogger("ray.serve")


class EarlySender:
    """Connections from this router to its node's replicas (one per replica socket)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._conns: dict[str, asyncio.StreamWriter] = {}
        self._opening: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.num_sent = 0

    def send(self, routing_stats: Mapping[str, Any] | None, request: Any) -> bool:
        """Write ``request`` to the replica of ``routing_stats`` now (True), or not at all."""
        if not getattr(request, "reply_to", ""):
            return False  # NOTE: outputs as Ray items: the early run could not post them
        address = ReplyTo.decode(str((routing_stats or {}).get(ROUTING_STATS_KEY, "")))
        if address is None or not self.node_id or address.node_id != self.node_id:
            return False
        w = self._conns.get(address.path)
        if w is None or w.is_closing():
            self._conns.pop(address.path, None)
            self._open_later(address)
            return False
        if w.transport.get_write_buffer_size() > HIGH_WATER:
            return False  # NOTE: the replica is not reading: Serve's call alone will do
        try:
            body = frame(request)
        except Exception as exc:  # NOTE: an unpicklable argument: Serve's call alone carries it
            log.warning("early start: request not sent: %r", exc)
            return False
        w.write(body)
        self.num_sent += 1
        return True

    def _open_later(self, address: ReplyTo) -> None:
        if address.path in self._opening:
            return
        self._opening.add(address.path)

        async def open_() -> None:
            try:
                _, w = await asyncio.open_unix_connection(address.path)
                w.write(hello(address.token))
                self._conns[address.path] = w
            except OSError as exc:
                log.info("early start: replica socket %s unreachable: %r", address.path, exc)
            finally:
                self._opening.discard(address.path)

        task = asyncio.get_running_loop().create_task(open_())
        self._tasks.add(task)  # NOTE: a reference, or the task may be collected unfinished
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for w in self._conns.values():
            w.close()
        self._conns.clear()
