"""Request bodies of the OpenAI routes: read within the size limit, parsed into the route's
pydantic model, errors as ``OpenAIError`` naming the first bad field."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from cluster.selector.policy import policy_names
from cluster.serve import openai_limits as limits
from cluster.serve.openai_protocol import OpenAIError

M = TypeVar("M", bound=BaseModel)


async def _read_body(request: Request, settings: limits.LimitSettings) -> bytes:
    """The body, counted while it arrives: 413 once it passes ``max_body_bytes`` (the guard
    has already refused a too-large declared Content-Length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        limits.check_body_bytes(size, settings)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[M], settings: limits.LimitSettings) -> M:
    """The JSON body as ``model``; OpenAIError 400 naming the first bad field (413 for a body
    over the limit; ``openai_limits.check_raw`` before validation).

    NOTE: parsed by hand rather than by a FastAPI body parameter: Serve's class-based ingress
    rewrites method signatures, which defeats FastAPI's resolution of postponed annotations.
    """
    raw = await _read_body(request, settings)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise OpenAIError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OpenAIError("request body must be a JSON object")
    limits.check_raw(data, model.model_fields, settings)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise OpenAIError(
            f"{loc + ': ' if loc else ''}{first.get('msg')}", param=loc or None
        ) from exc


def checked_policy(name: str | None) -> str:
    """A request's ``routing_policy``: "" when unset, else a registered policy name."""
    if not name:
        return ""
    if name not in policy_names():
        raise OpenAIError(
            f"unknown routing_policy {name!r}; known: {policy_names()}", param="routing_policy"
        )
    return name
