"""The ingress's front check, as FastAPI HTTP middleware: API key, then declared body size.

``install(api)`` adds it to the FastAPI app; the ingress replica sets ``api.state.guard`` to a
``Guard`` once its settings are loaded. Until then every guarded route answers 503 (fail
closed: a half-initialised ingress never serves without its key check).

Every refusal is OpenAI's error body: 401 ``invalid_api_key`` (with ``WWW-Authenticate:
Bearer``), 413 ``request_too_large``. Paths in ``PUBLIC_PATHS`` (``/health``) are not guarded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

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


def install(api: FastAPI) -> None:
    """Guard every route of ``api`` but ``PUBLIC_PATHS``."""

    @api.middleware("http")
    async def _guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path not in PUBLIC_PATHS:
            guard: Guard | None = getattr(api.state, "guard", None)
            try:
                if guard is None:
                    raise OpenAIError("the server is starting", 503, "server_error")
                guard.check(request)
            except OpenAIError as err:
                headers = {"WWW-Authenticate": "Bearer"} if err.status_code == 401 else None
                return JSONResponse(err.body(), status_code=err.status_code, headers=headers)
        return await call_next(request)
