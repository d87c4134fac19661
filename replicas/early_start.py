"""A request handed to its replica before Serve's call for it arrives ("early start").

Why: at c=1 Serve's handle hop from the router's choice to the replica's ``generate`` is the one
large hop left on the served path: ~2.7 ms on the CPU box, 3.1-3.4 ms on the H100 hosts, of
which ~1.0 is Ray's actor call and the rest Serve's send and its replica-side wrapper
(benchmarks/results/serve_overhead_notes.md, "Where Serve's handle hop goes"). The router runs
in the ingress's process and knows the replica as soon as it has chosen; over a same-node Unix
socket the request is there in ~0.1 ms, and the engine starts on it while Serve's call is still
on its way. Serve's call still comes and still owns the request: its accounting (ongoing
requests, ``max_ongoing_requests``, the autoscaler's counts), its end, errors and cancellation.

The contract:
- The replica listens on a socket in a private directory (0700) and publishes its address (node
  id, path, token: ``ReplyTo``'s form) in its routing stats under ``ROUTING_STATS_KEY``.
- The router (``cluster.serve.early_send``) writes the request there (``frame``: ``u32 length``
  + a pickle of the request; the connection opens with the token) just before it hands Serve
  its ranking, when the chosen replica is on its node and the request's outputs are posted to
  an inbox (``replicas.output_post``), never for outputs that travel as Ray items.
- The replica starts the request at once (``EarlyStarts``) unless it already has
  ``max_inflight`` requests in flight or has seen the request id. The run's outputs are held
  until Serve's call for the same request id claims it (``claim``), then posted as usual. A run
  not claimed within ``claim_timeout_s`` (Serve sent the call elsewhere: a full replica, a
  client gone before the send) is aborted, and nothing of it reaches anyone.
- A refused, failed or expired early start changes nothing for the client: Serve's call then
  runs the request the usual way (a failed run's error is not the answer; the usual run's is).
NOTE: pickle is safe here for the same reason as in ``output_post``: only this uid can reach
the socket, and only a peer that knows the token is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicas.output_post import HEADER, ReplyTo, serve_frames

log = logging.getLogger("ray.serve")
ROUTING_STATS_KEY = "early_start"  # NOTE: the replica's address in its routing stats
CLAIM_TIMEOUT_S = 5.0
SEEN_IDS = 4096  # NOTE: ids whose Serve call came: a late frame for one is refused

# (request, claimed) -> the run: posts the request's outputs once ``claimed`` is done (its
# result: the claim's wall-clock time)
StartFn = Callable[[Any, "asyncio.Future[float]"], Coroutine[Any, Any, None]]


def frame(request: Any) -> bytes:
    body = pickle.dumps(request, protocol=5)
    return HEADER.pack(len(body)) + body


@dataclass(eq=False, slots=True)
class _Run:
    task: asyncio.Task[None]
    claimed: asyncio.Future[float]
    timer: asyncio.TimerHandle
    expired: bool = False


@dataclass(slots=True)
class EarlyCounts:
    """What became of the early starts offered to this replica."""

    started: int = 0
    claimed: int = 0
    refused: int = 0  # full, a duplicate or late id, or an undecodable frame
    expired: int = 0  # never claimed within the timeout
    failed: int = 0  # ended with an error before their claim

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(eq=False)
class EarlyStarts:
    """One replica's early starts. ``start`` runs a request (the deployment's serving loop,
    holding its outputs until ``claimed``); ``has_room`` says whether one more may start now.
    Create and use on the loop that runs the replica's requests."""

    node_id: str
    start: StartFn
    has_room: Callable[[], bool]
    claim_timeout_s: float = CLAIM_TIMEOUT_S
    counts: EarlyCounts = field(default_factory=EarlyCounts)

    def __post_init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dir = Path(tempfile.mkdtemp(prefix="tinyserve-early-"))
        os.chmod(self._dir, 0o700)  # NOTE: only this uid can reach the socket
        self.address = ReplyTo(self.node_id, str(self._dir / "s"), secrets.token_hex(16))
        self._server: asyncio.Server | None = None

    async def listen(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.address.path)

    def routing_stats(self) -> dict[str, str]:
        """This replica's entry in its routing stats ({} until it listens)."""
        return {ROUTING_STATS_KEY: self.address.encode()} if self._server is not None else {}

    # -- the socket ------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_frames(reader, writer, self.address.token, self._on_frame, "early start")

    def _on_frame(self, body: bytes) -> None:
        try:
            request = pickle.loads(body)
            request_id = request.request_id
        except Exception as exc:  # NOTE: one bad frame is refused, the link kept
            log.warning("early start: an undecodable request was refused: %r", exc)
            self.counts.refused += 1
            return
        self.offer(request_id, request)

    # -- runs ------------------------------------------------------------------------------------
    def offer(self, request_id: str, request: Any) -> bool:
        """Start ``request`` now, or refuse (False): no room, or its id is running or was seen."""
        if request_id in self._runs or request_id in self._seen or not self.has_room():
            self.counts.refused += 1
            return False
        loop = asyncio.get_running_loop()
        claimed: asyncio.Future[float] = loop.create_future()
        timer = loop.call_later(self.claim_timeout_s, self._expire, request_id)
        run = self._runs[request_id] = _Run(
            loop.create_task(self.start(request, claimed)), claimed, timer)
        run.task.add_done_callback(lambda task: self._ended(request_id, run, task))
        self.counts.started += 1
        return True

    async def claim(self, request_id: str) -> asyncio.Task[None] | None:
        """Serve's call for ``request_id`` has come: its early run (released to post its
        outputs; await it for its end or error), or None (run the request the usual way; an
        expired run has ended by then, so the id is free in the engine)."""
        self._seen[request_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        run = self._runs.pop(request_id, None)
        if run is None:
            return None
        if run.expired:
            await asyncio.wait({run.task})
            return None
        run.timer.cancel()
        run.claimed.set_result(time.time())
        self.counts.claimed += 1
        return run.task

    def _expire(self, request_id: str) -> None:
        run = self._runs.get(request_id)  # NOTE: a claimed run has left the table
        if run is not None and not run.claimed.done():
            run.expired = True
            self.counts.expired += 1
            run.task.cancel()

    def _ended(self, request_id: str, run: _Run, task: asyncio.Task[None]) -> None:
        if run.claimed.done():
            return  # NOTE: claimed: Serve's call awaits the task and reports its end
        run.timer.cancel()
        if self._runs.get(request_id) is run:
            del self._runs[request_id]  # NOTE: a call that comes later runs the request anew
        if not task.cancelled() and task.exception() is not None:
            self.counts.failed += 1
            log.info("early start of %s failed before its claim: %r", request_id,
                     task.exception())

    def close(self) -> None:
        """Stop listening and abort every unclaimed run."""
        if self._server is not None:
            self._server.close()
        for run in self._runs.values():
            if not run.claimed.done():
                run.task.cancel()
        self._runs.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

