"""AsyncLLMEngine: streaming, abortable generation on top of LLMEngine (the public API).

    engine = AsyncLLMEngine(EngineConfig(...))
    async for out in engine.generate(request_id, prompt_token_ids, SamplingParams(...)):
        ...                                   # RequestOutput deltas; the last has finished=True
    async for out in engine.generate(request_id, prompt_token_ids, params, n=4):
        ...                                   # 4 sequences' deltas, interleaved, out.index 0-3
    engine.abort(request_id); engine.take_events(); engine.stats(); await engine.shutdown()

The engine core steps on its own thread (``tinyserve-engine-core``)::

    event loop(s)                         engine-core thread
    generate() -> pending adds  --lock-->  apply adds/aborts, step(), step(), ...
    _stream() <- asyncio.Queue  <--------  one call_soon_threadsafe per loop per step
                                           (that step's outputs, one per request)

so streaming never waits on a step and a step never waits on streaming: the next step starts
as soon as the last one's outputs are handed over, whatever the loop is doing. Every engine
mutation happens on that thread, between steps. Leaving the ``async for`` early (break,
cancellation) aborts the request. A structured-output grammar is compiled on a worker thread
before the request is queued (``replicas.structured_output``); ``n`` > 1 queues the request's
sequences in one hand-over (``replicas.parallel_sampling``).
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
from replicas.llm_engine import LLMEngine
from replicas.outputs import RequestMetrics, RequestOutput, merge_outputs
from replicas.parallel_sampling import check_n, child_params, child_request_id
from replicas.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar

_Add = tuple[str, list[int], SamplingParams, "xgrammar.CompiledGrammar | None"]

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
    """Async facade. Construct inside or outside a running loop; the engine-core thread
    starts on the first ``generate`` call and serves every loop that streams from it."""

    def __init__(
        self,
        config: EngineConfig,
        engine: LLMEngine | None = None,
        idle_check_after_s: float = IDLE_CHECK_AFTER_S,
    ) -> None:
        self.engine = engine if engine is not None else LLMEngine(config)
        self.config = config
        self.idle_check_after_s = idle_check_after_s
        self._sinks: dict[str, _Sink] = {}
        # NOTE: guards the pending lists, _sinks and _stopped; the engine itself is touched
        # only by the core thread (and by shutdown() after that thread has ended).
        self._cond = threading.Condition()
        self._pending_adds: list[_Add] = []
        self._pending_aborts: list[str] = []
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's HF tokenizer (with its chat template), or None."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def _ensure_core(self) -> None:
        if self._stopped:
            raise RuntimeError("engine is shut down")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run_core, name="tinyserve-engine-core", daemon=True
            )
            self._thread.start()

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
        self.engine.validate(request_id, prompt_token_ids, sampling_params)
        if n > 1:
            return self._stream_parallel(request_id, list(prompt_token_ids), sampling_params, n)
        return self._stream(request_id, list(prompt_token_ids), sampling_params)

    async def _compile(self, params: SamplingParams) -> xgrammar.CompiledGrammar | None:
        """The request's grammar, compiled on a worker thread (never on the step thread)."""
        spec = params.structured_output
        if spec is None:
            return None
        return await asyncio.to_thread(lambda: self.engine.grammar_compiler().compile(spec))

    def _register(self, sink: _Sink, adds: list[_Add]) -> None:
        """Queue ``adds`` for the core thread in one hand-over (one step admits them all)."""
        with self._cond:
            taken = [a[0] for a in adds if a[0] in self._sinks]
            if taken:
                raise ValueError(f"request_id {taken[0]!r} is already in use")
            self._ensure_core()
            for add in adds:
                self._sinks[add[0]] = sink
            self._pending_adds.extend(adds)
            self._cond.notify()

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
            with self._cond:
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
            with self._cond:
                for rid in index:
                    self._sinks.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown/finished); its stream ends with "abort"."""
        with self._cond:
            self._pending_aborts.append(request_id)
            self._cond.notify()

    # -- the engine-core thread ------------------------------------------------------------------
    def _run_core(self) -> None:
        """Apply adds/aborts, step, hand outputs to their loops; sleep when idle."""
        checked_idle = True
        while True:
            with self._cond:
                while not (
                    self._stopped
                    or self._pending_adds
                    or self._pending_aborts
                    or self.engine.has_unfinished_requests()
                ):
                    if not checked_idle:
                        # NOTE: the check waits for a quiet spell (IDLE_CHECK_AFTER_S); new work
                        # ends the wait and leaves the check for the next idle spell.
                        if self._cond.wait(timeout=self.idle_check_after_s):
                            continue
                        checked_idle = True
                        self._cond.release()
                        try:
                            self._check_idle()
                        finally:
                            self._cond.acquire()
                        continue
                    self._cond.wait()
                if self._stopped:
                    return
                adds, self._pending_adds = self._pending_adds, []
                aborts, self._pending_aborts = self._pending_aborts, []
            checked_idle = False
            routed: list[tuple[str, RequestOutput | BaseException]] = []
            for rid, prompt, params, grammar in adds:
                try:
                    self.engine.add_request(rid, prompt, params, grammar)
                except ValueError as exc:
                    routed.append((rid, exc))
            for rid in aborts:
                out = self.engine.abort(rid)
                if out is not None:
                    routed.append((rid, out))
            if self.engine.has_unfinished_requests():
                routed.extend((out.request_id, out) for out in self._step())
            self._route(routed)

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as exc:  # NOTE: a broken step must not hang every stream.
            logger.exception("engine step failed; aborting every request")
            failed = [rid for rid in list(self.engine.requests) if self.engine.abort(rid)]
            # NOTE: blocks are hashed when scheduled (replicas.scheduler), so the failed
            # step may have cached hashes over K/V it never wrote; with every request
            # aborted no block is in use and the reset cannot be refused.
            with self.engine.lock:
                self.engine.kv.reset_prefix_cache()
            self._route([(rid, RuntimeError(f"engine step failed: {exc!r}")) for rid in failed])
            return []

    def _check_idle(self) -> None:
        # NOTE: idle: every block is free or cached, the cheapest moment to verify.
        try:
            with self.engine.lock:
                self.engine.kv.check_integrity()
        except AssertionError:
            logger.exception("KV pool integrity check failed")

    def _route(self, routed: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """One ``call_soon_threadsafe`` per loop for a whole step's outputs."""
        if not routed:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, Any]]] = {}
        with self._cond:
            for rid, item in routed:
                sink = self._sinks.get(rid)
                if sink is not None:
                    by_loop.setdefault(sink.loop, []).append((sink, item))
        for loop, batch in by_loop.items():
            # NOTE: a loop closed under a stream (its asyncio.run ended) has no reader left.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, batch)

    # -- observability and shutdown ------------------------------------------------------------
    def take_events(self) -> list[KVEvent]:
        """Drain the pool's KV events (blocks at most one step while one runs: call it off
        the event loop, e.g. ``asyncio.to_thread``)."""
        return self.engine.take_events()

    def cached_block_hashes(self) -> list[int]:
        """The pool's resident cached block hashes (blocks at most one step while one runs)."""
        return self.engine.cached_block_hashes()

    def stats(self) -> PoolStats:
        """The pool's stats snapshot (blocks at most one step while one runs)."""
        return self.engine.stats()

    def check_integrity(self) -> None:
        """The pool's ``check_integrity()`` between steps (AssertionError when broken; blocks
        at most one step while one runs)."""
        with self.engine.lock:
            self.engine.kv.check_integrity()

    async def shutdown(self) -> None:
        """Stop the core thread after its current step, then abort everything still in
        flight (each open stream ends with finish_reason "abort")."""
        with self._cond:
            self._stopped = True
            adds, self._pending_adds = self._pending_adds, []
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        routed: list[tuple[str, RequestOutput | BaseException]] = [
            (rid, RuntimeError("engine is shut down")) for rid, *_ in adds
        ]
        for rid in list(self.engine.requests):
            out = self.engine.abort(rid)
            if out is not None:
                routed.append((rid, out))
        self._route(routed)
