"""Asynchronous scheduling (``EngineConfig.async_scheduling``): step N+1 is scheduled and
launched while step N still runs, as vLLM v1's async scheduler does.

One ``AsyncStepper.step()`` call::

    schedule(N+1)      pending tokens of step N are placeholders (Request.num_pending_tokens)
    launch(N+1)        forward + sample on the lane; placeholder input ids are gathered on
                       the device from step N's sampled ids; the sampled ids of N+1 start a
                       non-blocking copy to pinned host memory (an event after it)
    resolve(N)         wait for step N's tokens (the event / the worker), append them, check
                       stops, stream: returns step N's outputs

    host    | sched N+1 | launch N+1 | resolve N, outputs | (caller) | sched N+2 | launch N+2 |
    device  ... step N ][ step N+1 ...................................][ step N+2 ...

The lane is where a step's device work is issued: on CUDA inline on the calling thread (the
stream orders the steps; the host only launches), on CPU a single worker thread (its FIFO
orders the steps; torch releases the GIL in its ops, so the forward overlaps the host's
Python). Stops are checked one step late: a request that stopped at step N's token was already
computed once more by step N+1; that token is discarded (never appended, streamed or hashed:
blocks are hashed only once their tokens are known, ``Scheduler.commit_known``). A request
certain to end by length is not scheduled past its last token. Requests whose sampling reads
their outputs on the host (penalties, a structured-output grammar) cannot have a token in
flight: while any is unfinished the engine drains and steps synchronously.

NOTE: the drained point. Work that moves blocks or rewrites block tables between steps
(compaction) must not run while a step is in flight: call ``LLMEngine.drain()`` first (it
resolves the step in flight and returns its outputs), then compact, then step again.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from replicas.outputs import RequestOutput
from replicas.request import Request
from replicas.sampled_tokens import HostSample, PendingTokens
from replicas.scheduler import ScheduledChunk, SchedulerOutput

if TYPE_CHECKING:
    from collections.abc import Callable

    from replicas.llm_engine import LLMEngine


@dataclass(slots=True)
class LaunchedStep:
    """What a step's device work produced: its sampling rows' requests (row order), their
    sampled ids on the device (the next step's placeholders) and the host copy under way."""

    requests: list[Request]
    pending: PendingTokens
    host: HostSample


@dataclass(slots=True)
class InFlightStep:
    """A launched step the host has not resolved yet."""

    result: Future[LaunchedStep]
    num_prefill_tokens: int
    num_decode_tokens: int
    launched_at: float


class StepLane:
    """Issues a step's device work in order: inline (CUDA), or on one worker thread (CPU)."""

    def __init__(self, worker_thread: bool) -> None:
        self.worker_thread = worker_thread
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyserve-forward")
            if worker_thread
            else None
        )

    def submit(self, job: Callable[[], LaunchedStep]) -> Future[LaunchedStep]:
        if self._pool is not None:
            return self._pool.submit(job)
        done: Future[LaunchedStep] = Future()
        try:
            done.set_result(job())
        except Exception as exc:  # NOTE: raised where the worker's would be: at resolve
            done.set_exception(exc)
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class AsyncStepper:
    """The asynchronous step loop over one LLMEngine's parts (module docstring). Driven by
    ``LLMEngine.step`` under the engine's lock; one step in flight at most."""

    def __init__(self, engine: LLMEngine, worker_thread: bool) -> None:
        self.engine = engine
        self.lane = StepLane(worker_thread)
        self._in_flight: InFlightStep | None = None
        self._last_resolved = time.perf_counter()
        # NOTE: tokens computed past a stop (or an abort) and dropped: the price of checking
        # stops one step late.
        self.num_discarded_tokens = 0

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Schedule and launch the next step, then resolve the one in flight; returns the
        resolved step's outputs (empty on the first call of a run)."""
        eng = self.engine
        if any(r.needs_host_history for r in eng.requests.values()):
            # NOTE: penalties / grammar read the outputs so far: no token may be in flight.
            return self.drain() + eng.step_sync()
        sched = eng.scheduler.schedule()
        launched: InFlightStep | None = None
        if sched.chunks:
            launched = self._launch(sched)
        outputs = self.drain()
        self._in_flight = launched
        return outputs

    def _launch(self, sched: SchedulerOutput) -> InFlightStep:
        eng = self.engine
        prev = self._in_flight
        chunks = sched.chunks
        needs_prev = any(c.placeholder for c in chunks)
        assert prev is not None or not needs_prev, "a placeholder without a step in flight"
        runner, sampler = eng.runner, eng.sampler

        def job() -> LaunchedStep:
            pending = prev.result.result().pending if needs_prev and prev is not None else None
            sampling, logits = runner.execute(chunks, pending)
            requests = [c.request for c in sampling]
            # NOTE: outputs before each sampled token, fixed by the chunk (the host appends
            # the previous step's token while this runs).
            counts = [c.end - c.request.num_prompt_tokens for c in sampling]
            sample = sampler.sample(logits, requests, counts)
            rows = {r.request_id: i for i, r in enumerate(requests)}
            return LaunchedStep(requests, PendingTokens(sample.token_ids, rows), sample.to_host())

        num_prefill = sum(c.num_new_tokens for c in chunks if c.num_new_tokens > 1)
        eng.num_steps += 1
        result = self.lane.submit(job)
        eng.scheduler.update(sched)
        _mark_pending(chunks)
        return InFlightStep(
            result, num_prefill, sched.num_batched_tokens - num_prefill, time.perf_counter()
        )

    def drain(self) -> list[RequestOutput]:
        """Resolve the step in flight, if any: wait for its tokens, append them, check stops.
        Returns its outputs (one per request it sampled that was still unfinished)."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            return []
        launched = step.result.result()
        sampled = launched.host.output()
        eng = self.engine
        outputs: list[RequestOutput] = []
        for req, token_id, logprobs in zip(
            launched.requests, sampled.token_ids, sampled.logprobs, strict=True
        ):
            req.num_pending_tokens -= 1
            if req.is_finished:  # stopped (or aborted) while this token was computed
                self.num_discarded_tokens += 1
                continue
            outputs.append(eng.emit_token(req, token_id, logprobs))
            if not req.is_finished:
                eng.scheduler.commit_known(req)
        now = time.perf_counter()
        # NOTE: the time this step held the pipeline: from its launch, or from the previous
        # resolve when it was launched while that step still ran.
        busy = now - max(step.launched_at, self._last_resolved)
        self._last_resolved = now
        eng.rates.observe(step.num_prefill_tokens, step.num_decode_tokens, busy)
        return outputs

    def discard(self) -> None:
        """After a failed step: wait for the step in flight (ignoring its error) and forget it;
        no request keeps a pending token."""
        step, self._in_flight = self._in_flight, None
        if step is not None:
            with contextlib.suppress(Exception):
                step.result.result()
        for req in self.engine.requests.values():
            req.num_pending_tokens = 0

    def close(self) -> None:
        self.discard()
        self.lane.close()


def _mark_pending(chunks: list[ScheduledChunk]) -> None:
    """Each sampling chunk's request has one more token on the device."""
    for c in chunks:
        if c.samples:
            c.request.num_pending_tokens += 1
