"""AsyncLLMEngine: streaming, abortable generation on top of LLMEngine (the public API).

    engine = AsyncLLMEngine(EngineConfig(...))
    async for out in engine.generate(request_id, prompt_token_ids, SamplingParams(...)):
        ...                                   # RequestOutput deltas; the last has finished=True
    engine.abort(request_id); engine.take_events(); engine.stats(); await engine.shutdown()

One background task drives the engine: it applies queued adds/aborts, then runs ``step()`` in
a worker thread (so the event loop keeps serving while the model computes) and routes each
output to its request's queue. Every engine mutation happens on that task, between steps.
Leaving the ``async for`` early (break, cancellation) aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from kvmanager.events import KVEvent
from kvmanager.metrics import PoolStats
from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.outputs import RequestMetrics, RequestOutput, merge_outputs
from replicas.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams"]


class AsyncLLMEngine:
    """Async facade. Construct inside or outside a running loop; the driver task starts on
    the first ``generate`` call."""

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None) -> None:
        self.engine = engine if engine is not None else LLMEngine(config)
        self.config = config
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending_adds: list[tuple[str, list[int], SamplingParams]] = []
        self._pending_aborts: list[str] = []
        self._wakeup: asyncio.Event | None = None
        self._driver: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's HF tokenizer (with its chat template), or None."""
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def _ensure_driver(self) -> None:
        if self._stopped:
            raise RuntimeError("engine is shut down")
        if self._driver is None or self._driver.done():
            self._wakeup = asyncio.Event()
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling_params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Validate now (ValueError naming the limit, nothing scheduled), then return the
        request's output stream; the request is queued when iteration starts."""
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.engine.validate(request_id, prompt_token_ids, sampling_params)
        return self._stream(request_id, list(prompt_token_ids), sampling_params)

    async def _stream(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._ensure_driver()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append((request_id, prompt_token_ids, sampling_params))
        assert self._wakeup is not None
        self._wakeup.set()
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
                # token (TTFT) and the finishing output are never held.
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
            self._queues.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown/finished); its stream ends with "abort"."""
        self._pending_aborts.append(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def _apply_pending(self) -> None:
        adds, self._pending_adds = self._pending_adds, []
        for rid, prompt, params in adds:
            try:
                self.engine.add_request(rid, prompt, params)
            except ValueError as exc:
                self._route_error(rid, exc)
        aborts, self._pending_aborts = self._pending_aborts, []
        for rid in aborts:
            out = self.engine.abort(rid)
            if out is not None and rid in self._queues:
                self._queues[rid].put_nowait(out)

    def _route_error(self, request_id: str, exc: BaseException) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(exc)

    async def _drive(self) -> None:
        assert self._wakeup is not None
        while not self._stopped:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                if self._pending_adds or self._pending_aborts:
                    continue
                # NOTE: idle: every block is free or cached, the cheapest moment to verify.
                try:
                    with self.engine.lock:
                        self.engine.kv.check_integrity()
                except AssertionError:
                    logger.exception("KV pool integrity check failed")
                await self._wakeup.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as exc:  # NOTE: a broken step must not hang every stream.
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._route_error(rid, RuntimeError(f"engine step failed: {exc!r}"))
                # NOTE: blocks are hashed when scheduled (replicas.scheduler), so the failed
                # step may have cached hashes over K/V it never wrote; with every request
                # aborted no block is in use and the reset cannot be refused.
                with self.engine.lock:
                    self.engine.kv.reset_prefix_cache()
                continue
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    def take_events(self) -> list[KVEvent]:
        """Drain the pool's KV events (blocks at most one step while one runs)."""
        return self.engine.take_events()

    def cached_block_hashes(self) -> list[int]:
        """The pool's resident cached block hashes (blocks at most one step while one runs)."""
        return self.engine.cached_block_hashes()

    def stats(self) -> PoolStats:
        """The pool's stats snapshot (blocks at most one step while one runs)."""
        return self.engine.stats()

    async def shutdown(self) -> None:
        """Stop the driver after its current step, then abort everything still in flight
        (each open stream ends with finish_reason "abort")."""
        self._stopped = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._driver is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        self._pending_adds.clear()
        for rid in list(self.engine.requests):
            out = self.engine.abort(rid)
            if out is not None and rid in self._queues:
                self._queues[rid].put_nowait(out)
