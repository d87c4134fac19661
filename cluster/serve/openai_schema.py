"""The ingress's published OpenAPI schema (``GET /openapi.json``, behind the API key like
every route but ``/health``).

The route methods read their bodies by hand (``cluster.serve.openai_parse``: size limits, OpenAI's
error shape), so FastAPI sees no body parameter and would publish none. ``install_openapi``
replaces FastAPI's schema builder: the paths FastAPI knows, plus for each route
``ROUTES`` names its request body (the same pydantic model the route validates with), its
answers (the response models below; SSE for ``stream: true``) and the error statuses it can
give, all as ``components/schemas``. The fuzz test (schemathesis, in
``tests/cluster/test_app_api_e2e.py``) generates requests from it and checks the answers
against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from cluster.serve.openai_extras import DetokenizeRequest, TokenizeRequest
from cluster.serve.openai_protocol import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Open):
    """OpenAI's error body."""

    error: ErrorDetail


class PromptTokensDetails(_Open):
    cached_tokens: int


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Open):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(_Open):
    prompt: str


class HealthResponse(_Open):
    status: str


@dataclass(frozen=True, slots=True)
class Route:
    """What the schema says of one operation beyond FastAPI's view of it (``errors``: the
    statuses answered with an ``ErrorResponse``; ``answer_errors``: those answered with the
    route's own ``answer`` body, e.g. /health's 503)."""

    body: type[BaseModel] | None
    answer: type[BaseModel]
    errors: tuple[int, ...]
    streams: bool = False
    answer_errors: tuple[int, ...] = ()


# NOTE: 401 no or a wrong key, 413 body too large, 503 the ingress still starting (the guard,
# cluster.serve.openai_guard) or no replica answered; 400 bad input, 404 another model's name.
_BODY_ERRORS = (400, 401, 404, 413, 503)
ROUTES: dict[tuple[str, str], Route] = {
    ("post", "/v1/chat/completions"): Route(
        ChatCompletionRequest, ChatCompletion, _BODY_ERRORS, streams=True
    ),
    ("post", "/v1/completions"): Route(CompletionRequest, Completion, _BODY_ERRORS, streams=True),
    ("post", "/tokenize"): Route(TokenizeRequest, TokenizeResponse, _BODY_ERRORS),
    ("post", "/detokenize"): Route(DetokenizeRequest, DetokenizeResponse, _BODY_ERRORS),
    ("get", "/v1/models"): Route(None, ModelList, (401, 503)),
    # NOTE: 400 too: the HTTP server refuses a path it cannot decode
    ("get", "/v1/models/{model}"): Route(None, ModelCard, (400, 401, 404, 503)),
    ("get", "/health"): Route(None, HealthResponse, (), answer_errors=(503,)),
}
_MODELS: list[type[BaseModel]] = [
    ErrorResponse,
    *{m for r in ROUTES.values() for m in (r.body, r.answer) if m is not None},
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(op: dict[str, Any], route: Route) -> None:
    ok: dict[str, Any] = _json(_ref(route.answer))
    if route.streams:
        ok["text/event-stream"] = {
            "schema": {"type": "string", "description": "SSE: data: <chunk JSON>, then "
                       "data: [DONE] (an error event before it if the stream fails)"}
        }
    op["responses"] = {
        "200": {"description": "OK", "content": ok},
        **{
            str(code): {"description": "OpenAI error", "content": _json(_ref(ErrorResponse))}
            for code in route.errors
        },
        **{
            str(code): {"description": "unhealthy", "content": _json(_ref(route.answer))}
            for code in route.answer_errors
        },
    }
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": _json(_ref(route.body))}


def _narrow_model(components: dict[str, Any], model_name: str) -> None:
    """``model`` of every request body: the one served name (another answers 404)."""
    only = {"type": "string", "enum": [model_name], "description": "the served model"}
    for route in ROUTES.values():
        if route.body is None:
            continue
        props = components[route.body.__name__]["properties"]
        required = "model" in components[route.body.__name__].get("required", [])
        props["model"] = only if required else {"anyOf": [only, {"type": "null"}]}


def build_openapi(api: FastAPI, model_name: str | None = None) -> dict[str, Any]:
    """The whole schema (see the module docstring); with ``model_name`` the request bodies'
    ``model`` is that name."""
    schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
    paths: dict[str, Any] = schema.setdefault("paths", {})
    # NOTE: Starlette's ``{model:path}`` converter shows as ``{model}`` in OpenAPI.
    for (method, path), route in ROUTES.items():
        op = paths.setdefault(path, {}).setdefault(method, {"summary": path})
        _operation(op, route)
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template=REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):  # NOTE: FastAPI's 422, never sent
        components.pop(unused, None)
    components.update(defs.get("$defs", {}))
    if model_name:
        _narrow_model(components, model_name)
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in paths.items():
        for op in ops.values():
            op["security"] = [] if path == "/health" else [{"bearer": []}]
    return schema


def install_openapi(api: FastAPI, model_name: str | None = None) -> None:
    """Serve ``build_openapi(api, model_name)`` as the app's ``/openapi.json`` (built on first
    use, then cached; a new call resets it)."""
    api.openapi_schema = None

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = build_openapi(api, model_name)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
