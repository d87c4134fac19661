"""AsyncLLMEngine: streaming, abortable generation on top of LLMEngine (the public API).

    engine = AsyncLLMEngine(EngineConfig(...))
    async for out in engine.generate(request_id, prompt_token_ids, SamplingParams(...)):
        ...                                   # RequestOutput deltas; the last has finished=True
    async for out in engine.generate(request_id, prompt_token_ids, params, n=4):
        ...                                   # 4 sequences' deltas, interleaved, out.index 0-3
    engine.abort(request_id); engine.take_events(); engine.stats(); await engine.shutdown()

The engine core steps on its own thread (``replicas.engine_core_thread``, the default) or,
with ``EngineConfig.engine_process``, in its own process (``replicas.engine_core_proc``)::

    event loop(s)                          engine core (thread, or child process over a socket pair)
    generate() -> core.submit()  ------->  apply adds/aborts, step(), step(), ...
    _stream() <- asyncio.Queue   <-------  route(): one call_soon_threadsafe per loop per step
                                           (that step's outputs, one per request)

so streaming never waits on a step and a step never waits on streaming. Every engine
mutation happens in the core, between steps. Leaving the ``async for`` early (break,
cancellation) aborts the request. A structured-output grammar is compiled off the step loop
before the request is added (``replicas.structured_output``); ``n`` > 1 queues the request's
sequences in one hand-over (``replicas.parallel_sampling``). The process core keeps the
engine's Python off this process's GIL; a core that dies fails every open stream with a
RuntimeError and ``check_health`` raises from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from kvmanager.events import KVEvent
from kvmanager.metrics import PoolStats
from replicas.config import EngineConfig
from replicas.engine_core_thread import ThreadCore
from replicas.engine_core_turn import Add, Routed
from replicas.llm_engine import LLMEngine
from replicas.outputs import RequestMetrics, RequestOutput, merge_outputs
from replicas.parallel_sampling import check_n, child_params, child_request_id
from replicas.rate_meter import Rates
from replicas.sampling_params import SamplingParams
from replicas.sparse import SparseAttentionStats

if TYPE_CHECKING:
    import xgrammar

    from replicas.engine_core_proc import ProcessCore

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams"]


class _Sink:
    """Where one request's outputs go: its queue, on the loop that iterates it."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


def _deliver(batch: list[tuple[_Sink, RequestOutput | BaseException]]) -> None:
    """Runs on the sinks' loop: hand a step's outputs to their streams."""
    for sink, item in batch:
        sink.queue.put_nowait(item)


# NOTE: the pool's integrity check walks every block (~40 ms at 60k blocks, ~140 ms at 224k,
# a GPU replica's pool) holding the GIL and the engine: run right when a replica goes idle, it
# delayed the last output of the request that just finished and the first token of the next.
# It runs once a replica has stayed idle this long instead.
IDLE_CHECK_AFTER_S = 1.0


class AsyncLLMEngine:
    """Async facade. Construct inside or outside a running loop. The thread core starts on
    the first ``generate`` call; the process core (``config.engine_process``) starts here and
    returns once its engine is built. Either serves every loop that streams from it."""

    def __init__(
        self,
        config: EngineConfig,
        engine: LLMEngine | None = None,
        idle_check_after_s: float = IDLE_CHECK_AFTER_S,
    ) -> None:
        self.config = config
        self.idle_check_after_s = idle_check_after_s
        self._sinks: dict[str, _Sink] = {}
        self._lock = threading.Lock()  # NOTE: guards _sinks
        self._core: ThreadCore | ProcessCore
        if config.engine_process:
            if engine is not None:
                raise ValueError("engine_process: the engine is built in its own process")
            from replicas.engine_core_proc import ProcessCore

            self._core = ProcessCore(config, self._route, self._fail_all, idle_check_after_s)
        else:
            engine = engine if engine is not None else LLMEngine(config)
            self._core = ThreadCore(engine, self._route, idle_check_after_s)

    @property
    def engine(self) -> LLMEngine:
        """The in-process LLMEngine (tests, benchmarks). RuntimeError with ``engine_process``:
        the engine lives in the child; use this facade's methods."""
        if isinstance(self._core, ThreadCore):
            return self._core.engine
        raise RuntimeError("engine_process: the LLMEngine runs in its own process")

    @property
    def core_pid(self) -> int | None:
        """The engine-core process's pid (None: the core is a thread of this process)."""
        return self._core.pid

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's HF tokenizer (with its chat template), or None."""
        return self._core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        n: int = 1,
    ) -> AsyncIterator[RequestOutput]:
        """Validate now (ValueError naming the limit, nothing scheduled), then return the
        request's output stream; the request is queued when iteration starts (after its
        grammar, if any, compiled: a bad schema raises ValueError there, before any output).
        ``n`` > 1: ``n`` sequences of the prompt, their deltas interleaved, ``index`` set."""
        check_n(n)
        if request_id in self._sinks:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._core.check_health()
        self._core.limits.check(prompt_token_ids, sampling_params)
        if n > 1:
            return self._stream_parallel(request_id, list(prompt_token_ids), sampling_params, n)
        return self._stream(request_id, list(prompt_token_ids), sampling_params)

    async def _compile(self, params: SamplingParams) -> xgrammar.CompiledGrammar | None:
        """The request's grammar, compiled on a worker thread (never on the step thread).
        NOTE: the process core compiles in the child (a compiled grammar does not cross
        processes); its errors reach the stream the same way, before any output."""
        spec = params.structured_output
        if spec is None or not isinstance(self._core, ThreadCore):
            return None
        engine = self._core.engine
        return await asyncio.to_thread(lambda: engine.grammar_compiler().compile(spec))

    def _register(self, sink: _Sink, adds: list[Add]) -> None:
        """Queue ``adds`` for the core in one hand-over (one step admits them all)."""
        with self._lock:
            taken = [a[0] for a in adds if a[0] in self._sinks]
            if taken:
                raise ValueError(f"request_id {taken[0]!r} is already in use")
            for add in adds:
                self._sinks[add[0]] = sink
            try:
                self._core.submit(adds)
            except BaseException:
                for add in adds:
                    self._sinks.pop(add[0], None)
                raise

    async def _stream(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        sink = _Sink(asyncio.get_running_loop())
        grammar = await self._compile(sampling_params)
        self._register(sink, [(request_id, prompt_token_ids, sampling_params, grammar)])
        queue = sink.queue
        finished = False
        sent_first = False
        interval = self.config.stream_interval
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                error: BaseException | None = None
                # NOTE: hold deltas back until ``stream_interval`` tokens are ready; the first
                # token (TTFT) and the finishing output are never held. Whatever queued up
                # while the consumer was busy goes out merged, as one delta.
                while not item.finished and (
                    not queue.empty()
                    or (sent_first and len(item.new_token_ids) < interval)
                ):
                    nxt = await queue.get()
                    if isinstance(nxt, BaseException):
                        error = nxt
                        break
                    item = merge_outputs(item, nxt)
                sent_first = sent_first or bool(item.new_token_ids)
                finished = item.finished
                yield item
                if error is not None:
                    raise error
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._sinks.pop(request_id, None)

    async def _stream_parallel(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int
    ) -> AsyncIterator[RequestOutput]:
        """``n`` child sequences on one queue; each delta tagged with its child's ``index``.
        Whatever queued up while the consumer was busy is merged per child."""
        sink = _Sink(asyncio.get_running_loop())
        grammar = await self._compile(params)
        index = {child_request_id(request_id, i): i for i in range(n)}
        self._register(
            sink,
            [(rid, prompt_token_ids, child_params(params, i), grammar) for rid, i in index.items()],
        )
        unfinished = set(index)
        try:
            while unfinished:
                items = [await sink.queue.get()]
                while not sink.queue.empty():
                    items.append(sink.queue.get_nowait())
                merged: dict[str, RequestOutput] = {}
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    prev = merged.get(item.request_id)
                    merged[item.request_id] = item if prev is None else merge_outputs(prev, item)
                for rid, out in merged.items():
                    out.index = index[rid]
                    if out.finished:
                        unfinished.discard(rid)
                    yield out
        finally:
            for rid in unfinished:
                self.abort(rid)
            with self._lock:
                for rid in index:
                    self._sinks.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown/finished); its stream ends with "abort"."""
        self._core.abort(request_id)

    # -- routing (called by the core: its thread, or the process core's reader thread) ---------
    def _route(self, routed: Routed) -> None:
        """One ``call_soon_threadsafe`` per loop for a whole step's outputs."""
        if not routed:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, Any]]] = {}
        with self._lock:
            for rid, item in routed:
                sink = self._sinks.get(rid)
                if sink is not None:
                    by_loop.setdefault(sink.loop, []).append((sink, item))
        for loop, batch in by_loop.items():
            # NOTE: a loop closed under a stream (its asyncio.run ended) has no reader left.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, batch)

    def _fail_all(self, exc: BaseException) -> None:
        """Every open stream raises ``exc`` (after what it already received)."""
        with self._lock:
            rids = list(self._sinks)
        self._route([(rid, exc) for rid in rids])

    # -- observability, health and shutdown ------------------------------------------------------
    def take_events(self) -> list[KVEvent]:
        """Drain the pool's KV events (blocks at most one step while one runs: call it off
        the event loop, e.g. ``asyncio.to_thread``)."""
        return self._core.take_events()

    def cached_block_hashes(self) -> list[int]:
        """The pool's resident cached block hashes (blocks at most one step while one runs)."""
        return self._core.cached_block_hashes()

    def stats(self) -> PoolStats:
        """The pool's stats snapshot (blocks at most one step while one runs)."""
        return self._core.stats()

    def check_integrity(self) -> None:
        """The pool's ``check_integrity()`` between steps (AssertionError when broken; blocks
        at most one step while one runs)."""
        self._core.check_integrity()

    def rates(self) -> Rates:
        """The engine's measured prefill/decode rates (``replicas.rate_meter``); never blocks."""
        return self._core.rates()

    def calibrate(self) -> Rates:
        """Measure the rates once, before serving (``replicas.rate_meter.calibrate``; must not
        run while requests are in flight)."""
        return self._core.calibrate()

    def sparse_stats(self) -> SparseAttentionStats | None:
        """Sparse attention's counters, None when it is off."""
        return self._core.sparse_stats()

    def check_health(self) -> None:
        """RuntimeError when the engine cannot serve: shut down, or its process died."""
        self._core.check_health()

    async def shutdown(self) -> None:
        """Stop the core after its current step, then abort everything in flight (each open
        stream ends with finish_reason "abort"); the process core's process has ended when
        this returns."""
        self._route(await asyncio.to_thread(self._core.shutdown))
        self._fail_all(RuntimeError("engine is shut down"))
