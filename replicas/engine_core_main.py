"""The engine-core process: an ``LLMEngine`` stepping in a child of the replica.

``run_engine_core`` is the child's entry point (``multiprocessing`` spawn: a fresh
interpreter, CUDA-safe). Its loop::

    poll(inputs, parent's pipe)         timeout 0 while requests run, else until work/idle check
    Adds   -> compile grammars on a worker thread if any, then add (between steps)
    Aborts -> abort                      Query -> Reply (between steps)
    step   -> one Step message           (that step's outputs, errors, rates)
    Shutdown -> abort all, Step, Bye, exit      parent's pipe closed (parent died) -> exit

NOTE: the child owns the engine outright, so none of its Python competes for the replica
process's GIL (Ray core worker, Serve's streaming, asyncio, metrics): the reason it exists.
"""

from __future__ import annotations

import logging
import pickle
import queue
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from replicas.config import EngineConfig
from replicas.engine_core_pipe import FrameReader, FrameWriter
from replicas.engine_core_turn import Add, Routed, abort_all, apply_inputs, check_idle, safe_step
from replicas.engine_core_wire import (
    QUERIES,
    Aborts,
    Adds,
    Bye,
    Inbound,
    Query,
    Ready,
    Reply,
    Shutdown,
    Step,
    error_kind,
    to_wire,
    to_wire_error,
)
from replicas.llm_engine import LLMEngine
from replicas.niceness import apply_niceness
from replicas.outputs import RequestOutput
from replicas.rate_meter import calibrate

logger = logging.getLogger(__name__)

# NOTE: while a grammar compiles on the worker thread, the idle loop wakes this often to pick
# it up (a compile takes milliseconds to seconds).
COMPILE_POLL_MS = 2
LINGER_S = 5.0  # NOTE: how long the last messages may take to leave when the child exits


class ParentGone(Exception):
    """The parent process died: the child exits without a word."""


class Outbox:
    """The child's outputs to the parent. A send never blocks the step loop
    (``FrameWriter``); once the parent is gone it raises ParentGone."""

    def __init__(self, sock: socket.socket) -> None:
        self.writer = FrameWriter(sock, "tinyserve-engine-outputs")
        self.encoder = msgspec.msgpack.Encoder()

    def send(self, msg: msgspec.Struct) -> None:
        try:
            self.writer.send(self.encoder.encode(msg))
        except OSError:
            raise ParentGone from None


def run_engine_core(
    config_json: str,
    sock: socket.socket,
    parent_alive: Connection,
    idle_check_after_s: float,
) -> None:
    """Build the engine, say ``Ready`` (or why not), serve until ``Shutdown`` or the parent
    is gone. ``sock``: this end of the parent's socket pair (inputs in, outputs out)."""
    inbox = FrameReader(sock)
    out = Outbox(sock)
    linger_s = LINGER_S
    try:
        try:
            config = EngineConfig.model_validate_json(config_json)
            if config.core_niceness is not None:
                # NOTE: before the engine's threads exist: each new thread inherits it
                apply_niceness(config.core_niceness)
            engine = LLMEngine(config)
        except Exception as exc:
            logger.exception("engine core failed to start")
            out.send(Ready(None, error_kind(exc), str(exc)))
            return
        out.send(Ready(engine.limits))
        CoreLoop(engine, inbox, out, parent_alive, idle_check_after_s).run()
    except ParentGone:
        logger.warning("engine core: the parent process is gone; exiting")
        linger_s = 0.0
    finally:
        out.writer.close(linger_s)
        sock.close()


class CoreLoop:
    """The child's loop (module docstring). Single-threaded except grammar compilation."""

    def __init__(
        self,
        engine: LLMEngine,
        inbox: FrameReader,
        outbox: Outbox,
        parent_alive: Connection,
        idle_check_after_s: float,
    ) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.idle_check_after_s = idle_check_after_s
        self.decoder = msgspec.msgpack.Decoder(Inbound)
        self.parent_fd = parent_alive.fileno()
        self.poller = select.poll()
        self.poller.register(inbox.fileno(), select.POLLIN)
        self.poller.register(self.parent_fd, select.POLLIN)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tinyserve-grammar")
        self._compiled: queue.SimpleQueue[tuple[list[Add], BaseException | None]] = (
            queue.SimpleQueue()
        )
        # request_id -> aborted while its grammar compiled
        self._compiling: dict[str, bool] = {}

    def run(self) -> None:
        checked_idle = True
        last_work = time.monotonic()
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                timeout: float | None = None
                if busy:
                    timeout = 0
                elif self._compiling:
                    timeout = COMPILE_POLL_MS
                elif not checked_idle:
                    wait = self.idle_check_after_s - (time.monotonic() - last_work)
                    timeout = max(0.0, wait) * 1e3
                events = dict(self.poller.poll(timeout))
                if self.parent_fd in events:
                    raise ParentGone
                adds, aborts, queries, stop = self._receive()
                if self.inbox.eof and not stop:
                    raise ParentGone  # NOTE: the parent closed its end
                routed: Routed = []
                adds += self._take_compiled(routed)
                if stop:
                    routed += [
                        (rid, RuntimeError("engine is shut down")) for rid in self._compiling
                    ]
                    self._send(routed + abort_all(self.engine))
                    self.outbox.send(Bye())
                    return
                if adds or aborts:
                    checked_idle = False
                    routed += apply_inputs(self.engine, adds, aborts)
                    last_work = time.monotonic()
                for q in queries:
                    self._answer(q)
                if self.engine.has_unfinished_requests():
                    checked_idle = False
                    routed += safe_step(self.engine)
                    last_work = time.monotonic()
                self._send(routed)
                if (
                    not checked_idle
                    and not self.engine.has_unfinished_requests()
                    and time.monotonic() - last_work >= self.idle_check_after_s
                ):
                    checked_idle = True
                    check_idle(self.engine)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- inputs ------------------------------------------------------------------------------------
    def _receive(self) -> tuple[list[Add], list[str], list[Query], bool]:
        """Everything queued on the inbox now: (adds ready to add, aborts, queries, stop)."""
        adds: list[Add] = []
        aborts: list[str] = []
        queries: list[Query] = []
        for frame in self.inbox.read():
            msg = self.decoder.decode(frame)
            if isinstance(msg, Adds):
                batch: list[Add] = [
                    (a.request_id, a.prompt_token_ids, a.params, None) for a in msg.adds
                ]
                spec = batch[0][2].structured_output if batch else None
                if spec is None:
                    adds += batch
                else:
                    self._compile(batch)
            elif isinstance(msg, Aborts):
                for rid in msg.request_ids:
                    if rid in self._compiling:
                        self._compiling[rid] = True
                    else:
                        aborts.append(rid)
            elif isinstance(msg, Query):
                queries.append(msg)
            elif isinstance(msg, Shutdown):
                return adds, aborts, queries, True
        return adds, aborts, queries, False

    def _compile(self, batch: list[Add]) -> None:
        """Compile the batch's grammar on the worker thread (never on the step loop)."""
        for rid, *_ in batch:
            self._compiling[rid] = False
        spec = batch[0][2].structured_output
        assert spec is not None

        def work() -> None:
            try:
                grammar = self.engine.grammar_compiler().compile(spec)
            except Exception as exc:
                self._compiled.put((batch, exc))
                return
            self._compiled.put(([(r, p, sp, grammar) for r, p, sp, _ in batch], None))

        self._pool.submit(work)

    def _take_compiled(self, routed: Routed) -> list[Add]:
        """Adds whose grammar is ready; a failed compile routes its error, an abort that came
        while compiling drops the add."""
        ready: list[Add] = []
        while True:
            try:
                batch, exc = self._compiled.get_nowait()
            except queue.Empty:
                return ready
            for add in batch:
                aborted = self._compiling.pop(add[0], False)
                if exc is not None:
                    routed.append((add[0], exc))
                elif not aborted:
                    ready.append(add)

    def _answer(self, q: Query) -> None:
        try:
            result = self._run_query(q.name)
            reply = Reply(q.query_id, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:  # NOTE: AssertionError (a broken pool) included
            reply = Reply(q.query_id, b"", error_kind(exc), str(exc))
        self.outbox.send(reply)

    def _run_query(self, name: str) -> Any:
        engine = self.engine
        if name not in QUERIES:
            raise ValueError(f"unknown engine-core query {name!r}")
        if name == "stats":
            return engine.stats()
        if name == "take_events":
            return engine.take_events()
        if name == "cached_block_hashes":
            return engine.cached_block_hashes()
        if name == "check_integrity":
            with engine.lock:
                engine.kv.check_integrity()
            return None
        if name == "calibrate":
            return calibrate(engine)
        sparse = engine.runner.sparse
        return sparse.stats() if sparse is not None else None

    # -- outputs -----------------------------------------------------------------------------------
    def _send(self, routed: Routed) -> None:
        if not routed:
            return
        outputs = []
        errors = []
        for rid, item in routed:
            if isinstance(item, RequestOutput):
                outputs.append(to_wire(item))
            else:
                errors.append(to_wire_error(rid, item))
        rates = self.engine.rates.rates()
        step = Step(outputs, errors, rates.prefill_tokens_per_s, rates.decode_tokens_per_s)
        self.outbox.send(step)
