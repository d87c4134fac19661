"""The ingress's front check, as ASGI middleware: API key, then declared body size.

``install(api)`` adds it to the FastAPI app; the ingress replica sets ``api.state.guard`` to a
``Guard`` once its settings are loaded. Until then every guarded route answers 503 (fail
closed: a half-initialised ingress never serves without its key check).

Every refusal is OpenAI's error body: 401 ``invalid_api_key`` (with ``WWW-Authenticate:
Bearer``), 413 ``request_too_large``. Paths in ``PUBLIC_PATHS`` (``/health``) are not guarded.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.serve.openai_auth import PUBLIC_PATHS, ApiKeys
from cluster.serve.openai_limits import LimitSettings, check_body_size
from cluster.serve.openai_protocol import OpenAIError


@dataclass(frozen=True, slots=True)
class Guard:
    """``keys`` None = auth off (local use, loopback only)."""

    keys: ApiKeys | None
    limits: LimitSettings

    def check(self, request: Request) -> None:
        """Raises OpenAIError when the request may not proceed."""
        if self.keys is not None and not self.keys.check(request.headers.get("authorization")):
            raise OpenAIError(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                status_code=401,
                code="invalid_api_key",
            )
        check_body_size(request.headers.get("content-length"), self.limits)


class _GuardMiddleware:
    """Pure ASGI middleware (not ``@app.middleware("http")``).

    NOTE: Starlette's BaseHTTPMiddleware runs the route in a task group and pipes every
    response message through a memory stream; on the streaming path that costs a task switch
    per SSE chunk. A plain ASGI wrapper checks the headers and hands the call on untouched."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            if request.url.path not in PUBLIC_PATHS:
                guard: Guard | None = getattr(self.api.state, "guard", None)
                try:
                    if guard is None:
                        raise OpenAIError("the server is starting", 503, "server_error")
                    guard.check(request)
                except OpenAIError as err:
                    headers = {"WWW-Authenticate": "Bearer"} if err.status_code == 401 else None
                    response = JSONResponse(
                        err.body(), status_code=err.status_code, headers=headers
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def install(api: FastAPI) -> None:
    """Guard every route of ``api`` but ``PUBLIC_PATHS``."""
    api.add_middleware(_GuardMiddleware, api=api)
