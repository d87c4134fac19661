"""LLMReplica: the Serve deployment that wraps one AsyncLLMEngine.

    handle.options(stream=True).generate.remote(GenerateRequest(...))  -> RequestOutput deltas

- Token ids arrive with the request (the ingress tokenized once); the replica never
  re-tokenizes, so the router's block hashes and the pool's agree by construction.
- A background loop drains the pool's KV events every ``report_interval_s`` and hands them,
  plus a load snapshot, to a ``KVSink`` (the selection service's ReportKV stream). The sink
  comes from an injected factory: ``replicas`` never imports ``cluster`` (dependency
  direction), the app builder passes ``cluster.serve.app_reporting.SelectorSink``. That
  reporting half (``ReplicaLoad``, ``SinkSpec``, ``KVSink``, the loop) lives in
  ``deployment_report.py`` (``ReplicaReporting``); this file holds the request, serving and
  Serve's hooks.
- Outputs leave as the engine's deltas when streamed (thinned out above
  ``stream_max_outputs_per_s`` a second), as one per sequence when not
  (``replicas.output_pacing``).
- Cancelling the Serve call (client disconnect) aborts the request in the engine.
- ``record_routing_stats`` / ``check_health`` / ``__del__`` are Serve's hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from replicas.config import EngineConfig
from replicas.deployment_metrics import ReplicaMetrics
from replicas.deployment_report import KVSink, ReplicaReporting, SinkFactory
from replicas.deployment_report import (
    ReplicaLoad as ReplicaLoad,  # NOTE: re-exported: the app's sink and tests import it here
)
from replicas.deployment_report import (
    SinkSpec as SinkSpec,  # NOTE: re-exported: the app's sink and tests import it here
)
from replicas.early_start import EarlyStarts
from replicas.engine import AsyncLLMEngine
from replicas.loop_lag import LAG_WINDOW_S, LoopLag
from replicas.niceness import apply_niceness, niceness_of
from replicas.output_pacing import OutputPacer, StreamBudget
from replicas.output_post import OutputPost, ReplyTo
from replicas.outputs import RequestOutput, RequestTrace
from replicas.ray_node import serve_loop_flags, this_node_id
from replicas.sampling_params import SamplingParams

log = logging.getLogger("ray.serve")
EWMA_ALPHA = 0.2


@dataclass(slots=True)
class GenerateRequest:
    """One request as it travels ingress -> router -> replica.

    ``prompt`` is the text form, read only by Ray's own ``PrefixCacheAffinityRouter`` (it
    looks for a ``.prompt`` attribute); the engine uses ``prompt_token_ids``.
    ``routing_policy`` asks the TinyServe router for one selection-service policy ("" = its
    configured one), for A/B runs over one deployment. ``n`` > 1 asks for that many sequences
    of the prompt (one routed request; the replica's engine fans out, sharing the prompt's
    blocks), their outputs tagged with ``index``. ``stream`` False asks for one output per
    sequence, at its end (the deltas folded by the replica): the caller reads nothing before
    the response is whole, so it need not pay a handle hop per delta. ``reply_to``
    (``ReplyTo.encode()``) names the ingress's output inbox: the request's outputs are posted
    there when the replica runs on its node (``replicas.output_post``), not yielded.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str = ""
    session_id: str = ""
    routing_policy: str = ""
    n: int = 1
    stream: bool = True
    reply_to: str = ""


def remaining_work_tokens(num_prompt: int, max_tokens: int, out: RequestOutput | None) -> int:
    """Tokens a request still has to compute: the whole prompt plus max_tokens until its first
    output; after it the prompt is done (cached or computed) and only the outputs still owed
    remain. NOTE: this is the load the replica reports to the selection service; counting
    prompt + max_tokens for the whole life of a request (cached tokens included) made the
    load term blind to real queued work in the simulator (benchmarks/README.md)."""
    if out is None or out.num_output_tokens == 0:
        return num_prompt + max_tokens
    return max(max_tokens - out.num_output_tokens, 0)


@serve.deployment(name="LLMReplica", max_ongoing_requests=64, health_check_period_s=5)
class LLMReplica(ReplicaReporting):
    """One engine per replica. ``selector`` is the selection service's handle (or None)."""

    async def __init__(  # type: ignore[misc]  # NOTE: Serve awaits async constructors.
        self,
        engine_config: dict[str, Any],
        selector: Any = None,
        sink_factory: SinkFactory | None = None,
        report_interval_s: float = 0.05,
        stream_max_outputs_per_s: float = 0.0,
        early_start_max_inflight: int = 0,
    ) -> None:
        apply_niceness()  # NOTE: first: the engine core's process inherits it
        self.config = EngineConfig(**engine_config)
        self.engine = AsyncLLMEngine(self.config)
        # NOTE: measured before serving (the core thread starts with the first request), so
        # the first snapshot already carries this replica's own rates.
        rates = await asyncio.to_thread(self.engine.calibrate)
        log.info("replica rates: prefill %.0f tok/s, decode %.0f tok/s",
                 rates.prefill_tokens_per_s, rates.decode_tokens_per_s)
        ctx = serve.get_replica_context()
        self.replica_id: str = ctx.replica_id.unique_id
        self.metrics = ReplicaMetrics()
        self._selector = selector
        self._sink_factory = sink_factory
        self._sink: KVSink | None = None
        self._address: str | None = None
        self._inflight: dict[str, int] = {}  # request_id -> tokens still to compute
        self._ttft_ewma = 0.0
        self._tpot_ewma = 0.0
        self._interval = report_interval_s
        self._stream_budget = StreamBudget(stream_max_outputs_per_s)
        self._stopping = False
        self._loop_task = asyncio.get_running_loop().create_task(self._report_loop())
        self._loop_lag = LoopLag.from_env()
        self._post = OutputPost(this_node_id())
        if self._loop_lag is not None:
            self._loop_lag.ensure_running()
        # NOTE: early starts (replicas.early_start): on while there is room for one more
        # request under the deployment's max_ongoing_requests (0 = off).
        self._early: EarlyStarts | None = None
        if early_start_max_inflight > 0:
            self._early = EarlyStarts(
                this_node_id(), self._run_early,
                lambda: len(self._inflight) < early_start_max_inflight)
            await self._early.listen()

    # -- serving -------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's RequestOutput deltas (``request.stream`` False: one output per
        sequence, its deltas merged); ValueError (before any output) for a request the engine
        refuses (too long, bad sampling params). A request the router started early
        (``replicas.early_start``) is claimed: its run posts the outputs, this call ends
        with it."""
        if self._stopping:
            raise RuntimeError("replica is shutting down")
        recv = time.time()
        if self._early is not None:
            run = await self._early.claim(request.request_id)
            if run is not None:
                await run  # NOTE: cancelling this call cancels the run (abort in the engine)
                return
        conn = await self._post_connection(request)
        async for out in self._serve(request, conn, recv):
            yield out

    async def _run_early(self, request: GenerateRequest, claimed: asyncio.Future[float]) -> None:
        """An early start's run (``EarlyStarts.start``): its outputs posted once claimed.
        RuntimeError when its inbox is not reachable (the claiming call then runs it)."""
        recv = time.time()
        conn = await self._post_connection(request)
        if conn is None:
            raise RuntimeError("early start without a reachable output inbox")
        async for _ in self._serve(request, conn, recv, claimed):
            pass  # NOTE: posted, never yielded

    async def _serve(
        self,
        request: GenerateRequest,
        conn: asyncio.StreamWriter | None,
        recv: float,
        claimed: asyncio.Future[float] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Run ``request`` in the engine: its outputs yielded (``conn`` None) or posted to its
        inbox, the first of them only once ``claimed`` (an early start's claim) is done."""
        rid = request.request_id
        n = request.n
        stream = self.engine.generate(
            rid, request.prompt_token_ids, request.sampling_params, n=n
        )
        # NOTE: n sequences owe n times the outputs (approximated from the latest delta).
        num_prompt, max_tokens = len(request.prompt_token_ids), request.sampling_params.max_tokens
        max_tokens *= n
        self._inflight[rid] = remaining_work_tokens(num_prompt, max_tokens, None)
        first_yield = claim_time = 0.0
        num_outputs = 0
        # NOTE: every output yielded is a Ray item the ingress receives (and, streamed, an SSE
        # chunk the proxy forwards): folded for a non-streamed request, thinned out under load
        # for a streamed one (replicas.output_pacing); posted to the ingress's inbox instead
        # of yielded when it runs on this node (replicas.output_post).
        pacer = OutputPacer(self._stream_budget, request.stream, n)
        try:
            with pacer:
                async for delta in stream:
                    self._inflight[rid] = remaining_work_tokens(num_prompt, max_tokens, delta)
                    if delta.finished:
                        self._on_finished(rid, delta, feedback=delta.index == 0)
                    now = time.time()
                    out = pacer.offer(delta, now)
                    if out is None:
                        continue
                    if claimed is not None:
                        # NOTE: an early start posts nothing before its claim
                        claim_time = await claimed
                        claimed = None
                        now = time.time()
                    out.emit_time = now
                    num_outputs += 1
                    if not first_yield:
                        first_yield = now
                    if out.trace is not None:
                        out.trace.replica_recv = recv
                        out.trace.replica_claim = claim_time
                        out.trace.replica_first_yield = first_yield
                        out.trace.num_outputs = num_outputs
                        if self._loop_lag is not None:
                            self._stamp_lag(out.trace)
                    if conn is None:
                        yield out
                    else:
                        await OutputPost.send(conn, rid, out)
        except Exception:
            if claimed is not None and not claimed.done():
                raise  # NOTE: unclaimed: nothing of it may reach the ingress
            # NOTE: what the engine generated before failing still goes out first.
            for out in pacer.flush():
                out.emit_time = time.time()
                if conn is None:
                    yield out
                else:
                    with contextlib.suppress(ConnectionError):
                        await OutputPost.send(conn, rid, out)
            raise
        finally:
            self._inflight.pop(rid, None)
            # NOTE: an exit on an error of ours (a lost inbox) must abort the engine's request
            # now, not when the stream is collected.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _post_connection(self, request: GenerateRequest) -> asyncio.StreamWriter | None:
        """The connection to the request's inbox when its outputs are to be posted (an inbox
        on this node), else None (yielded as Ray items). A failed connect falls back to Ray
        items."""
        reply_to = ReplyTo.decode(request.reply_to)
        if reply_to is None or not self._post.accepts(reply_to):
            return None
        try:
            return await self._post.connection(reply_to)
        except OSError as exc:
            log.warning("output inbox %s unreachable (%r): outputs go as Ray items",
                        reply_to.path, exc)
            return None

    def _stamp_lag(self, trace: RequestTrace) -> None:
        assert self._loop_lag is not None
        lag = self._loop_lag
        trace.replica_lag_before_s = lag.max_between(trace.replica_recv - LAG_WINDOW_S,
                                                     trace.replica_recv)
        if trace.engine_add:
            trace.replica_lag_queue_s = lag.max_between(trace.replica_recv, trace.engine_add)

    def _on_finished(self, request_id: str, out: RequestOutput, feedback: bool = True) -> None:
        self.metrics.on_finished(out)
        m = out.metrics
        if m.ttft_s is not None:
            self._ttft_ewma += EWMA_ALPHA * (m.ttft_s - self._ttft_ewma)
        if m.tpot_s is not None:
            self._tpot_ewma += EWMA_ALPHA * (m.tpot_s - self._tpot_ewma)
        # NOTE: the router routed one request: one outcome (the first sequence's) goes back.
        if self._sink is not None and feedback and out.finish_reason != "abort":
            self._sink.feedback(request_id, out)

    # -- Serve hooks -----------------------------------------------------------------------------
    def record_routing_stats(self) -> dict[str, Any]:
        """Per-replica stats Serve hands to request routers (``RunningReplica.routing_stats``)."""
        stats = self.engine.stats()
        return {
            "num_inflight": len(self._inflight),
            "num_inflight_tokens": sum(self._inflight.values()),
            "kv_usage": stats.usage,
            "num_cached_blocks": stats.num_cached_blocks,
            "ttft_ewma_s": self._ttft_ewma,
            "prefix_query_tokens": stats.prefix_query_tokens,
            "prefix_hit_tokens": stats.prefix_hit_tokens,
            **(self._early.routing_stats() if self._early is not None else {}),
        }

    def check_health(self) -> None:
        """Serve restarts the replica when this raises."""
        if self._loop_task.done() and not self._stopping:
            raise RuntimeError("the replica's report loop died")
        # NOTE: a dead engine-core process (or a shut-down engine) fails here at once.
        self.engine.check_health()
        self.engine.stats()

    def stats(self) -> dict[str, Any]:
        """Pool stats + identity (for tests, benchmarks and operators)."""
        d = self.engine.stats().to_dict()
        rates = self.engine.rates()
        d.update(
            replica_id=self.replica_id,
            node_id=this_node_id(),
            prefill_tokens_per_s=rates.prefill_tokens_per_s,
            decode_tokens_per_s=rates.decode_tokens_per_s,
            num_inflight=len(self._inflight),
            selector_address=self._address,
            selector_connected=bool(self._sink and self._sink.connected()),
            serve_loops=serve_loop_flags(),
            niceness=os.getpriority(os.PRIO_PROCESS, 0),
            core_niceness=niceness_of(self.engine.core_pid),
            early_starts=self._early.counts.to_dict() if self._early is not None else None,
        )
        return d

    async def check_integrity(self) -> dict[str, Any]:
        """The pool's ``check_integrity()`` run now, between steps, plus what is still held
        (for soak and fault runs: at rest, ``num_used_blocks`` and ``num_requests`` are 0).
        Never raises: a broken invariant comes back as ``ok=False`` with its message."""
        error = ""
        try:
            await asyncio.to_thread(self.engine.check_integrity)
        except AssertionError as exc:
            error = str(exc) or "AssertionError"
        stats = await asyncio.to_thread(self.engine.stats)
        return {
            "replica_id": self.replica_id,
            "ok": not error,
            "error": error,
            "num_inflight": len(self._inflight),
            "num_requests": stats.num_requests,
            "num_used_blocks": stats.num_used_blocks,
            "num_free_blocks": stats.num_free_blocks,
            "num_cached_blocks": stats.num_cached_blocks,
            "num_blocks": stats.num_blocks,
        }

    async def __del__(self) -> None:
        """Graceful shutdown: stop reporting, end open streams with "abort", leave the
        selection service (goodbye)."""
        self._stopping = True
        with contextlib.suppress(Exception):
            await self.engine.shutdown()
        self._post.close()  # NOTE: its sockets to the ingresses' output inboxes
        if self._early is not None:
            self._early.close()
        if self._sink is not None:
            self._sink.close()
