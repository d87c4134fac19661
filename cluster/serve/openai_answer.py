"""How the ingress answers one ``GenerateRequest``: the call to an LLM replica, re-sent to
another one when a replica dies before anything reached the client (``MAX_ATTEMPTS``), its
outputs merged with what the replica posted to this ingress's inbox, and the response made of
them: one JSON body (``stream`` false) or an SSE stream.

Contract: a mixin of ``OpenAIIngress`` (openai_ingress.py), which builds the state declared
below. NOTE: no route lives here, so postponed annotations are safe in this file (FastAPI
cannot resolve them on a route method of Serve's class-based ingress: see openai_ingress.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import ActorUnavailableError, RayActorError

from cluster.serve.openai_protocol import OpenAIError
from cluster.serve.openai_responses import Accumulated, ResponseContext, sse
from cluster.serve.openai_trace import IngressTrace, TraceLog
from cluster.serve.output_inbox import OutputInbox, merge_posted
from replicas.deployment import GenerateRequest
from replicas.outputs import RequestOutput

log = logging.getLogger("ray.serve")
MAX_ATTEMPTS = 3


def _cause(exc: BaseException) -> BaseException:
    """The user-level exception inside a Ray task error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class IngressAnswer:
    """A request's replica call and its response, over the state ``OpenAIIngress`` builds
    (declared here)."""

    llm: Any
    trace_log: TraceLog
    _inbox: OutputInbox | None
    num_active: int  # requests whose replica call is under way (``_outputs`` running)


    async def _outputs(
        self, req: GenerateRequest, restartable: bool, trace: IngressTrace
    ) -> AsyncIterator[RequestOutput | None]:
        """The replica's deltas. If a replica dies, the request is re-sent to another one
        (up to ``MAX_ATTEMPTS``) when nothing has reached the client yet: before the first
        delta, or at any point when ``restartable`` (a non-streamed response, whose caller
        then gets ``None``, meaning "discard what you accumulated")."""
        self.num_active += 1
        try:
            base_id = req.request_id
            for attempt in range(MAX_ATTEMPTS):
                if attempt:
                    req.request_id = f"{base_id}~{attempt}"
                gen = self.llm.generate.remote(req)
                started = done = False
                try:
                    async for out in self._arrivals(gen, req):
                        started = True
                        trace.on_output(out)
                        yield out
                    done = True
                    return
                except (RayActorError, ActorUnavailableError) as exc:
                    done = True
                    if (started and not restartable) or attempt == MAX_ATTEMPTS - 1:
                        raise OpenAIError(
                            f"replica failed: {type(exc).__name__}", 503, "server_error"
                        ) from exc
                    log.warning(
                        "request %s: replica died (%s); retrying on another replica",
                        base_id,
                        type(exc).__name__,
                    )
                    if started:
                        yield None
                except ValueError as exc:
                    done = True
                    raise OpenAIError(str(_cause(exc))) from exc
                except OpenAIError:
                    done = True
                    raise
                except Exception as exc:
                    # NOTE: e.g. a failed engine step: OpenAI's server_error, never a bare 500 or a
                    # stream cut without an error event.
                    done = True
                    log.warning("request %s failed: %r", base_id, _cause(exc))
                    raise OpenAIError(
                        f"generation failed: {type(_cause(exc)).__name__}", 500, "server_error"
                    ) from exc
                finally:
                    if not done:
                        gen.cancel()  # NOTE: client went away: abort on the replica.
        finally:
            self.num_active -= 1

    async def _arrivals(self, gen: Any, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The call's outputs: its Ray items, merged with what its replica posted to this
        ingress's inbox (``cluster.serve.output_inbox``) when the request named it."""
        inbox = self._inbox
        if not req.reply_to or inbox is None:
            async for out in gen:
                yield out
            return
        queue = inbox.open(req.request_id)
        try:
            async for out in merge_posted(gen, queue, req.n):
                yield out
        finally:
            inbox.close(req.request_id)

    async def _reply_to(self) -> str:
        """The inbox's address for a request ("" = outputs as Ray items)."""
        if self._inbox is None:
            return ""
        await self._inbox.start()
        return self._inbox.reply_to.encode()

    async def _respond(
        self,
        ctx: ResponseContext,
        req: GenerateRequest,
        stream: bool,
        include_usage: bool,
        trace: IngressTrace,
    ) -> Any:
        outputs = self._outputs(req, restartable=not stream, trace=trace)
        if not stream:
            accs = [Accumulated() for _ in range(req.n)]
            async for out in outputs:
                if out is None:
                    # the replica died mid-way: start over elsewhere
                    accs = [Accumulated() for _ in range(req.n)]
                else:
                    accs[out.index].add(out)
            response = JSONResponse(ctx.body(accs))
            trace.on_sent(first=True, last=True)
            self.trace_log.add(trace)
            return response
        # NOTE: wait for the first delta before answering 200, so a refused request (too
        # long, bad parameters) still gets a 4xx status instead of an error inside the stream.
        first = await outputs.__anext__()
        assert first is not None
        return StreamingResponse(
            self._sse(ctx, first, outputs, include_usage, trace, req.n),
            media_type="text/event-stream",
        )

    async def _sse(
        self,
        ctx: ResponseContext,
        first: RequestOutput,
        rest: AsyncIterator[RequestOutput | None],
        include_usage: bool,
        trace: IngressTrace,
        n: int = 1,
    ) -> AsyncIterator[str]:
        # NOTE: n > 1: one accumulator per choice; chunks carry the choice's index and go out
        # in the order the sequences produced them (interleaved).
        accs = [Accumulated() for _ in range(n)]
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        async def chain() -> AsyncIterator[RequestOutput]:
            yield first
            async for out in rest:
                assert out is not None  # NOTE: streams are never restarted after output
                yield out

        if ctx.endpoint == "chat":
            for index in range(n):
                yield sse({**ctx.chunk("", first=True, index=index), **extra})
        try:
            async for out in chain():
                acc = accs[out.index]
                offset = len(acc.text)
                acc.add(out)
                if out.text_delta or out.finished or out.logprobs:
                    trace.on_sent(first=bool(out.text_delta), last=out.finished)
                    yield sse(
                        {
                            **ctx.chunk(
                                out.text_delta,
                                out.new_token_ids,
                                out.logprobs,
                                out.finish_reason if out.finished else None,
                                text_offset=offset,
                                index=out.index,
                            ),
                            **extra,
                        }
                    )
            if include_usage:
                yield sse(ctx.usage_chunk(accs))
        except OpenAIError as err:
            yield sse(err.body())
        except Exception as exc:  # NOTE: whatever breaks, the client gets an error event
            log.warning("stream %s failed: %r", ctx.response_id, exc)
            yield sse(OpenAIError(f"stream failed: {type(exc).__name__}", 500,
                                  "server_error").body())
        self.trace_log.add(trace)
        yield sse("[DONE]")
