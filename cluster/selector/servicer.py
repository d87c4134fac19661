"""gRPC servicer (grpc.aio) of ``tinyserve.v1.CacheSelection`` over a ``SelectorCore``.

Failure contract: malformed or oversized input -> INVALID_ARGUMENT with a message (and the
``errors_total{kind="invalid_argument"}`` counter); unknown replicas are ignored and counted by
the core; a ReportKV stream only ever touches its own replica's state, and a rejected batch is
not applied (so the replica's next batch is a sequence gap and triggers a resync). An outcome
on a ReportKV stream is applied as the unary ``Feedback`` (``SelectorCore.feedback``); one for
another replica ends the stream (INVALID_ARGUMENT), a malformed one is counted as
``errors_total{kind="invalid_argument"}`` and skipped. No handler lets an exception escape
except through ``context.abort``.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cluster.selector.convert import (
    check_id,
    events_from_proto,
    load_from_proto,
    outcome_from_proto,
    replica_to_proto,
    select_request_from_proto,
    selection_to_proto,
)
from cluster.selector.core import SelectorCore
from cluster.selector.wire import MalformedMessage
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc

# NOTE: a resync lists a replica's resident blocks: at most its pool (hello.num_blocks) on
# the device tier; the bound covers a host tier too, at ~9 bytes a hash (~18 MB buffered).
MAX_RESYNC_HASHES = 2_000_000
# Replica ids that the streams of one peer host may hold open at once (one per GPU replica).
MAX_REPLICAS_PER_PEER = 256


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """``ipv4:10.0.0.5:41234`` -> ``ipv4:10.0.0.5`` (the port differs per connection)."""
    return str(context.peer() or "").rsplit(":", 1)[0]


class CacheSelectionServicer(pb_grpc.CacheSelectionServicer):
    """Thin async adapter: validate, convert, call the core (each call is short and CPU-bound,
    so it runs inline on the event loop)."""

    def __init__(self, core: SelectorCore) -> None:
        self.core = core
        self._peer_replicas: dict[str, dict[str, int]] = {}  # host -> replica_id -> streams
        self._flush = lambda _context: core.flush()  # NOTE: a done callback's signature

    async def _invalid(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        self.core.metrics.errors.labels("invalid_argument").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Select(
        self, request: pb.SelectRequest, context: grpc.aio.ServicerContext
    ) -> pb.SelectResponse:
        try:
            req, candidates = select_request_from_proto(request, self.core.config.max_prompt_blocks)
            sel = self.core.select(
                req,
                candidates,
                policy=request.policy,
                max_results=request.max_results,
                speculative=not request.no_speculative_insert,
            )
        except ValueError as exc:
            await self._invalid(context, exc)
            raise AssertionError("unreachable: abort raises") from exc
        return selection_to_proto(sel)

    async def select_wire(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``Select`` on the wire bytes (``SelectorCore.select_wire``: one compiled call for
        the tinyserve policy): what the server registers by default; ``Select`` above is the
        same RPC through protobuf objects. The answer goes out first: the Select's route
        (its pending marks, access bump and book-keeping) is deferred to the RPC's done
        callback (``SelectorCore.flush``), which runs once gRPC has sent the answer."""
        try:
            body = self.core.select_wire(raw, defer=True)
            # NOTE: ~30 us of a Select's work off its answer's path (benchmarks/README.md,
            # "Ninth pass"); a later call on the core makes the route first if this has not
            # run. A done callback, not call_soon: a list append in gRPC's Cython (~0.5 us)
            # where asyncio's Handle cost ~1.2 us before the answer.
            context.add_done_callback(self._flush)
            return body
        except MalformedMessage as exc:
            self.core.metrics.errors.labels("malformed").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {exc}")
            raise AssertionError("unreachable: abort raises") from exc
        except ValueError as exc:
            await self._invalid(context, exc)
            raise AssertionError("unreachable: abort raises") from exc

    async def ReportKV(
        self, request_iterator: AsyncIterator[pb.ReportKVRequest], context: grpc.aio.ServicerContext
    ) -> pb.ReportKVResponse:
        core = self.core
        replica_id = ""
        num_messages = 0
        last_seq = 0
        left = False
        resync_gpu: list[int] = []
        resync_cpu: list[int] = []
        max_resync = MAX_RESYNC_HASHES
        peer = _peer_host(context)
        try:
            async for msg in request_iterator:
                num_messages += 1
                kind = msg.WhichOneof("body")
                if not replica_id:
                    if kind != "hello":
                        raise ValueError(f"the first ReportKV message must be hello, got {kind}")
                    claimed = check_id(msg.replica_id, "replica_id")
                    self._claim(peer, claimed)
                    replica_id = claimed
                if msg.replica_id and msg.replica_id != replica_id:
                    raise ValueError(
                        f"stream of {replica_id!r} sent a message for {msg.replica_id!r}"
                    )
                if kind == "hello":
                    h = msg.hello
                    check_id(h.node_id, "node_id", required=False)
                    if h.num_blocks:
                        max_resync = min(MAX_RESYNC_HASHES, 2 * h.num_blocks)
                    core.join(replica_id, h.node_id, h.block_size or 16, h.num_blocks)
                elif kind == "batch":
                    events = events_from_proto(
                        msg.batch,
                        core.config.max_events_per_batch,
                        core.config.max_hashes_per_event,
                    )
                    res = core.apply_events(replica_id, msg.batch.seq, events)
                    if not res.applied:
                        # NOTE: gap, or the replica expired meanwhile: either way it must resync.
                        return pb.ReportKVResponse(
                            last_applied_seq=max(res.last_seq, 0),
                            resync_required=True,
                            num_messages=num_messages,
                        )
                    last_seq = res.last_seq
                elif kind == "resync":
                    r = msg.resync
                    resync_gpu.extend(r.block_hashes)
                    resync_cpu.extend(r.host_block_hashes)
                    if len(resync_gpu) + len(resync_cpu) > max_resync:
                        raise ValueError(f"resync exceeds {max_resync} block hashes")
                    if r.done:
                        core.resync(replica_id, r.seq, resync_gpu, resync_cpu)
                        last_seq = r.seq
                        resync_gpu, resync_cpu = [], []
                elif kind == "snapshot":
                    core.update_load(replica_id, load_from_proto(msg.snapshot))
                elif kind == "feedback":
                    self._stream_feedback(replica_id, msg.feedback)
                elif kind == "goodbye":
                    left = core.leave(replica_id)
                    break
                else:
                    raise ValueError("ReportKV message has no body")
        except ValueError as exc:
            await self._invalid(context, exc)
        finally:
            if replica_id:
                self._release(peer, replica_id)
            if replica_id and not left:
                core.disconnect(replica_id)
        return pb.ReportKVResponse(last_applied_seq=last_seq, num_messages=num_messages)

    def _claim(self, peer: str, replica_id: str) -> None:
        """Count an open stream of ``replica_id`` from ``peer``; ValueError past the limit
        (``_release`` is only reached for a claim that succeeded: the id is set after it)."""
        held = self._peer_replicas.setdefault(peer, {})
        if replica_id not in held and len(held) >= MAX_REPLICAS_PER_PEER:
            raise ValueError(f"{peer} already reports {len(held)} replicas; limit "
                             f"{MAX_REPLICAS_PER_PEER}")
        held[replica_id] = held.get(replica_id, 0) + 1

    def _release(self, peer: str, replica_id: str) -> None:
        held = self._peer_replicas.get(peer, {})
        if replica_id in held:
            held[replica_id] -= 1
            if held[replica_id] <= 0:
                del held[replica_id]
        if not held:
            self._peer_replicas.pop(peer, None)

    def _stream_feedback(self, replica_id: str, msg: pb.FeedbackRequest) -> None:
        """Apply an outcome that came on ``replica_id``'s ReportKV stream (``msg.replica_id``
        empty means that replica). ValueError for another replica's outcome."""
        if msg.replica_id and msg.replica_id != replica_id:
            raise ValueError(f"stream of {replica_id!r} sent feedback for {msg.replica_id!r}")
        msg.replica_id = replica_id
        try:
            outcome = outcome_from_proto(msg)
        except ValueError:
            # NOTE: a learning signal, not state: ending the stream for it would cost the
            # replica a full resync. Counted as the unary call's rejection is.
            self.core.metrics.errors.labels("invalid_argument").inc()
            return
        self.core.feedback(outcome)

    async def Feedback(
        self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackResponse:
        try:
            outcome = outcome_from_proto(request)
        except ValueError as exc:
            await self._invalid(context, exc)
            raise AssertionError("unreachable: abort raises") from exc
        return pb.FeedbackResponse(accepted=self.core.feedback(outcome))

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        s = self.core.stats()
        c = s.counters
        return pb.StatsResponse(
            num_replicas=s.num_replicas,
            num_unique_blocks=s.num_unique_blocks,
            num_selects=c["selects"],
            num_events=c["events"],
            num_unknown_replica=c["unknown_replica"],
            num_resyncs=c["resyncs"],
            num_feedback=c["feedback"],
            uptime_s=s.uptime_s,
            default_policy=s.default_policy,
            decisions=[
                pb.PolicyCount(policy=k, num_decisions=v) for k, v in sorted(s.decisions.items())
            ],
            tinyserve_w=list(s.tinyserve_w),
        )

    async def ListReplicas(
        self, request: pb.ListReplicasRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReplicasResponse:
        return pb.ListReplicasResponse(
            replicas=[replica_to_proto(r) for r in self.core.list_replicas()]
        )

    async def Ping(
        self, request: pb.PingRequest, context: grpc.aio.ServicerContext
    ) -> pb.PingResponse:
        return pb.PingResponse()


_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Shared-token auth: metadata ``authorization: Bearer <token>`` on every call except the
    standard health service (load balancers and k8s probes cannot send metadata)."""

    def __init__(self, token: str, on_reject: Callable[[], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else bytes(got)
        if hmac.compare_digest(got_b, self._expected):
            return handler
        if self._on_reject is not None:
            self._on_reject()
        return _rejecting(handler)


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong authorization token")

    args = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **args)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **args)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **args)
    return grpc.unary_unary_rpc_method_handler(deny, **args)
