"""ProcessCore: the engine core in a child process, behind ThreadCore's interface.

    replica process                                   engine-core process (spawn)
    AsyncLLMEngine ... submit/abort/query -------->   CoreLoop: add, abort, step, answer
    reader thread  <-------- Step / Reply / Bye ---   (replicas.engine_core_main)
      route(step's outputs) -> streams' loops
    parent's pipe  ------------------------------->   closed when this process dies: the
                                                      child exits (no orphan)

Messages are ``replicas.engine_core_wire`` structs, framed over one Unix socket pair
(``replicas.engine_core_pipe``: a send never blocks). The reader thread is the only reader;
sends are serialised by a lock. Queries (stats, events, ...) block the caller until the child
answers, between two steps (at most one step, as the thread core's lock), or
``QUERY_TIMEOUT_S``.

NOTE: spawn starts a fresh interpreter that re-imports the parent's ``__main__``: a script that
builds a process engine at import time needs the usual ``if __name__ == "__main__":`` guard
(Ray's worker entry point and pytest have one).

Failure: when the child exits without ``Bye`` (crash, OOM kill), the reader delivers what the
child had sent, then ``on_dead`` fails every open stream with a RuntimeError naming the exit
code, waiting queries raise, and ``check_health`` raises from then on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import pickle
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kvmanager.events import KVEvent
from kvmanager.metrics import PoolStats
from replicas.config import EngineConfig
from replicas.engine_core_main import run_engine_core
from replicas.engine_core_pipe import FrameReader, FrameWriter
from replicas.engine_core_turn import Add, Routed
from replicas.engine_core_wire import (
    Aborts,
    Adds,
    Bye,
    Outbound,
    Query,
    Ready,
    Reply,
    Shutdown,
    Step,
    WireAdd,
    from_wire,
    from_wire_error,
    make_error,
)
from replicas.rate_meter import Rates
from replicas.request_limits import RequestLimits
from replicas.sparse import SparseAttentionStats

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # NOTE: an 8B checkpoint loads in minutes from a cold disk
QUERY_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 30.0
# NOTE: after the child's exit, what it sent may still be unread: read until EOF, at most this
# long (a process the child forked, a compiler's worker, may hold its end open).
DRAIN_AFTER_EXIT_S = 0.2


class _Pending:
    """A query waiting for its Reply."""

    __slots__ = ("done", "error", "payload")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.payload = b""
        self.error: BaseException | None = None


class ProcessCore:
    """Starts the engine-core process and waits until its engine is built (raises what the
    child raised: ValueError for a bad config, RuntimeError otherwise). ``route`` gets each
    step's outputs, ``on_dead`` the error once the child has died (both on the reader thread)."""

    def __init__(
        self,
        config: EngineConfig,
        route: Callable[[Routed], None],
        on_dead: Callable[[BaseException], None],
        idle_check_after_s: float,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.config = config
        self._route = route
        self._on_dead = on_dead
        self._lock = threading.Lock()  # NOTE: guards the input socket, _pending, _dead
        self._pending: dict[int, _Pending] = {}
        self._query_ids = itertools.count()
        self._dead: BaseException | None = None
        self._closed = False
        self._rates = Rates()
        self._tokenizer: Any = None
        self._decoder = msgspec.msgpack.Decoder(Outbound)
        self._encoder = msgspec.msgpack.Encoder()
        self._sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._inbox = FrameWriter(self._sock, "tinyserve-engine-input")  # the child's inbox
        self._outbox = FrameReader(self._sock)  # the child's outbox
        mp = multiprocessing.get_context("spawn")
        # NOTE: the child holds the read end; this process holds the only write end, so its
        # death (however it dies) closes the pipe and wakes the child's poll.
        parent_alive, self._alive_w = mp.Pipe(duplex=False)
        self._proc = mp.Process(
            target=run_engine_core,
            args=(config.model_dump_json(), child_sock, parent_alive, idle_check_after_s),
            name="tinyserve-engine-core",
            daemon=True,
        )
        try:
            self._proc.start()
            parent_alive.close()
            child_sock.close()
            self.limits = self._wait_ready(start_timeout_s)
        except BaseException:
            child_sock.close()
            self._stop_process()
            self._close_sockets()
            raise
        self.max_model_len = self.limits.max_model_len
        self._reader = threading.Thread(
            target=self._read_loop, name="tinyserve-engine-output", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int | None:
        """The engine-core process's pid."""
        return self._proc.pid

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer, loaded here on first use (the child has its own)."""
        if self._tokenizer is None and self.limits.has_tokenizer:
            from replicas.model_loader import load_tokenizer
            from replicas.model_source import resolve_model_dir

            self._tokenizer = load_tokenizer(resolve_model_dir(self.config.model))
        return self._tokenizer

    def _wait_ready(self, timeout_s: float) -> RequestLimits:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"engine core process not ready after {timeout_s:.0f} s")
            ready, _, _ = select.select([self._outbox, self._proc.sentinel], [], [], left)
            frames = self._outbox.read() if self._outbox in ready else []
            if frames:
                # NOTE: Ready is the child's first message and it sends nothing else before
                # this process answers it with work.
                msg = self._decoder.decode(frames[0])
                assert isinstance(msg, Ready) and len(frames) == 1, msg
                if msg.limits is None:
                    raise make_error(msg.error_kind, f"engine core failed to start: {msg.error}")
                return msg.limits
            if self._outbox.eof or self._proc.sentinel in ready:
                self._proc.join(timeout=5.0)
                raise RuntimeError(
                    f"engine core process exited while starting (exit code {self._proc.exitcode})"
                )

    # -- inputs ----------------------------------------------------------------------------------
    def _send(self, msg: msgspec.Struct) -> None:
        """Caller holds ``_lock``. RuntimeError once the child is dead or shut down."""
        if self._dead is not None:
            raise RuntimeError(str(self._dead))
        if self._closed:
            raise RuntimeError("engine is shut down")
        try:
            self._inbox.send(self._encoder.encode(msg))  # NOTE: never blocks
        except OSError:
            raise RuntimeError("engine core process is not connected (exited?)") from None

    def submit(self, adds: list[Add]) -> None:
        """Send ``adds`` in one message (the child admits them in one step)."""
        wire = [WireAdd(rid, prompt, params) for rid, prompt, params, _ in adds]
        with self._lock:
            self._send(Adds(wire))

    def abort(self, request_id: str) -> None:
        with self._lock, contextlib.suppress(RuntimeError):
            self._send(Aborts([request_id]))

    # -- the reader thread -----------------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            # NOTE: at EOF the socket stays readable; only the process's end is waited for.
            waits: list[Any] = [self._proc.sentinel]
            if not self._outbox.eof:
                waits.append(self._outbox)
            ready, _, _ = select.select(waits, [], [])
            if self._drain():
                return
            if self._proc.sentinel in ready:
                deadline = time.monotonic() + DRAIN_AFTER_EXIT_S
                while time.monotonic() < deadline and not self._outbox.eof:
                    if self._outbox.wait(0.01) and self._drain():
                        return
                self._proc.join()
                code = self._proc.exitcode
                self._die(
                    RuntimeError(
                        "engine is shut down"
                        if self._closed
                        else f"engine core process died (exit code {code}); its requests failed"
                    )
                )
                return

    def _drain(self) -> bool:
        """Handle every message received so far; True once ``Bye`` came."""
        for frame in self._outbox.read():
            msg = self._decoder.decode(frame)
            if isinstance(msg, Step):
                self._rates = Rates(msg.prefill_tokens_per_s, msg.decode_tokens_per_s)
                routed: Routed = [(w.request_id, from_wire(w)) for w in msg.outputs]
                routed += [(e.request_id, from_wire_error(e)) for e in msg.errors]
                self._route(routed)
            elif isinstance(msg, Reply):
                with self._lock:
                    pending = self._pending.pop(msg.query_id, None)
                if pending is not None:
                    if msg.error_kind:
                        pending.error = make_error(msg.error_kind, msg.error)
                    pending.payload = msg.payload
                    pending.done.set()
            elif isinstance(msg, Bye):
                return True
        return False

    def _die(self, exc: BaseException) -> None:
        logger.error("%s", exc)
        with self._lock:
            self._dead = exc
            pending, self._pending = self._pending, {}
        for p in pending.values():
            p.error = RuntimeError(str(exc))
            p.done.set()
        self._on_dead(exc)

    # -- queries ---------------------------------------------------------------------------------
    def _query(self, name: str, timeout_s: float = QUERY_TIMEOUT_S) -> Any:
        pending = _Pending()
        with self._lock:
            query_id = next(self._query_ids)
            self._send(Query(query_id, name))
            self._pending[query_id] = pending
        if not pending.done.wait(timeout_s):
            with self._lock:
                self._pending.pop(query_id, None)
            raise RuntimeError(f"engine core did not answer {name!r} within {timeout_s:.0f} s")
        if pending.error is not None:
            raise pending.error
        return pickle.loads(pending.payload)

    def take_events(self) -> list[KVEvent]:
        return list(self._query("take_events"))

    def cached_block_hashes(self) -> list[int]:
        return list(self._query("cached_block_hashes"))

    def stats(self) -> PoolStats:
        stats: PoolStats = self._query("stats")
        return stats

    def check_integrity(self) -> None:
        self._query("check_integrity")

    def rates(self) -> Rates:
        """The rates the child sent with its latest step (no round trip)."""
        return self._rates

    def calibrate(self) -> Rates:
        rates: Rates = self._query("calibrate", timeout_s=START_TIMEOUT_S)
        self._rates = rates
        return rates

    def sparse_stats(self) -> SparseAttentionStats | None:
        if self.config.sparse_attention is None:
            return None
        stats: SparseAttentionStats | None = self._query("sparse_stats")
        return stats

    def check_health(self) -> None:
        """RuntimeError when the core cannot serve: its process died, or it is shut down."""
        if self._dead is not None:
            raise RuntimeError(str(self._dead))
        if self._closed:
            raise RuntimeError("engine is shut down")
        if not self._proc.is_alive():
            raise RuntimeError(f"engine core process exited (exit code {self._proc.exitcode})")

    # -- shutdown --------------------------------------------------------------------------------
    def shutdown(self) -> Routed:
        """Ask the child to abort everything and exit; wait for its last outputs (routed by
        the reader) and for the process to end (terminate, then kill, if it does not).
        Idempotent. Returns nothing left to route (the reader routed it)."""
        with self._lock:
            if self._closed:
                return []
            if self._dead is None:
                with contextlib.suppress(RuntimeError):
                    self._send(Shutdown())
            self._closed = True
        self._reader.join(timeout=SHUTDOWN_TIMEOUT_S)
        self._stop_process()
        self._reader.join()  # NOTE: returns once the process has ended, Bye or not
        self._close_sockets()
        return []

    def _stop_process(self) -> None:
        proc = self._proc
        if proc.pid is None:
            return
        proc.join(timeout=SHUTDOWN_TIMEOUT_S if self._closed else 0)
        if proc.is_alive():
            logger.warning("engine core process %s did not exit; terminating it", proc.pid)
            proc.terminate()
            proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join()

    def _close_sockets(self) -> None:
        self._inbox.close(timeout_s=0)
        self._sock.close()
        self._alive_w.close()
