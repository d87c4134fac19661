"""Malformed request bytes -> INVALID_ARGUMENT, not gRPC's UNKNOWN (the RPC world's 500).

grpc.aio parses a request with the handler's deserializer before any servicer code runs; a
truncated or corrupt message raises ``DecodeError`` there and the client gets UNKNOWN
("Unexpected DecodeError"), which reads as a server fault and escapes the service's error
counters (found by ``tests/cluster/test_selector_fuzz.py``). ``DecodeErrorInterceptor``
swaps in a deserializer that returns a ``Malformed`` marker instead of raising, and a
behaviour that answers INVALID_ARGUMENT for it: at once for a unary request, at the bad
message for a request stream (after the messages before it were handled, as for any other
invalid message of the stream).

Covers unary-unary and stream-unary handlers with coroutine behaviours (every method of
``CacheSelection`` and the health ``Check``); others pass through unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class Malformed:
    """What the lenient deserializer returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # NOTE: DecodeError, or anything a custom parser raises
            return Malformed(f"{type(exc).__name__}: {exc}")

    return parse


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """See the module docstring. ``on_reject`` is called once per refused request."""

    def __init__(self, on_reject: Callable[[], None] | None = None) -> None:
        self._on_reject = on_reject or (lambda: None)

    async def _refuse(self, context: grpc.aio.ServicerContext, bad: Malformed) -> None:
        self._on_reject()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {bad.error}")

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.response_streaming:
            return handler
        args = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if not handler.request_streaming:
            inner = handler.unary_unary
            if not inspect.iscoroutinefunction(inner):
                return handler

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await self._refuse(context, request)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **args)
        inner_stream = handler.stream_unary
        if not inspect.iscoroutinefunction(inner_stream):
            return handler

        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async def checked() -> AsyncIterator[Any]:
                async for msg in requests:
                    if isinstance(msg, Malformed):
                        await self._refuse(context, msg)
                    yield msg

            return await inner_stream(checked(), context)

        return grpc.stream_unary_rpc_method_handler(stream, **args)
