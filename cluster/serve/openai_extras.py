"""The ingress's other routes, as vLLM serves them, and OpenAI-shaped 404/405.

    GET  /v1/models/{model}   the model card, or 404 ``model_not_found``
    POST /tokenize            {"prompt": str} | {"messages": [...]}
                              -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize          {"tokens": [int]} -> {"prompt": str}

Pure functions of the tokenizer and the request (no Ray): the ingress's route methods call
them. ``install_error_handlers`` turns Starlette's HTTP errors (unknown path, wrong method)
into OpenAI's ``{"error": {...}}`` body with the same status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serve.openai_protocol import ChatMessage, OpenAIError
from cluster.serve.tokenizer_pool import encode_ids


def model_card(model_name: str, max_model_len: int) -> dict[str, Any]:
    """One entry of ``/v1/models`` (and the body of ``/v1/models/{model}``)."""
    return {
        "id": model_name,
        "object": "model",
        "created": 0,
        "owned_by": "tinyserve",
        "max_model_len": max_model_len,
    }


def fit_context(prompt_len: int, max_tokens: int, explicit: bool, max_model_len: int) -> int:
    """The request's ``max_tokens`` within the context: a 400 (vLLM's message) when the prompt
    plus an explicit limit exceeds ``max_model_len``; a server default is shortened to fit."""
    room = max_model_len - prompt_len
    if prompt_len + max_tokens <= max_model_len:
        return max_tokens
    if not explicit and room >= 1:
        return room
    raise OpenAIError(
        f"This model's maximum context length is {max_model_len} tokens. However, you "
        f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
        "in the completion). Please reduce the length of the prompt or completion.",
        param="max_tokens" if room >= 1 else "prompt",
        code="context_length_exceeded",
    )


def served_max_model_len(configured: int | None, model_dir: Path) -> int:
    """The engine's context limit, as ``replicas.model_loader`` derives it."""
    from replicas.model_config import load_arch_config

    arch = load_arch_config(model_dir)
    limit = arch.max_position_embeddings
    if arch.sliding_window is not None:
        limit = min(limit, arch.sliding_window)
    return configured or limit


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize`` body: a completion ``prompt`` or chat ``messages``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def render_chat(tokenizer: Any, chat: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template applied to ``chat``; OpenAIError 400 when the template refuses the
    conversation (empty, roles it does not accept, ...), never a 500.

    NOTE: found by the schemathesis fuzz: ``POST /tokenize`` with ``"messages": []`` raised
    transformers' ValueError out of the route (a plain-text 500)."""
    from jinja2 import TemplateError

    if not chat:
        raise OpenAIError("messages must not be empty", param="messages")
    try:
        return str(tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add_generation_prompt))
    except (ValueError, TypeError, TemplateError) as exc:
        raise OpenAIError(f"the chat template refused the messages: {exc}",
                          param="messages") from exc


def tokenize(tokenizer: Any, body: TokenizeRequest, max_model_len: int) -> dict[str, Any]:
    """Token ids of the prompt as the completion/chat endpoints would build them (the chat
    template applied for ``messages``; special tokens added for a plain prompt only, unless
    ``add_special_tokens`` says otherwise, as vLLM)."""
    if tokenizer is None:
        raise OpenAIError("this model has no tokenizer")
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIError("give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError("this model has no chat template", param="messages")
        text = render_chat(
            tokenizer,
            [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
             for m in body.messages],
            body.add_generation_prompt,
        )
        special = bool(body.add_special_tokens)
    else:
        text = body.prompt or ""  # NOTE: not None here (exactly one of the two is set)
        special = body.add_special_tokens is not False
    ids = encode_ids(tokenizer, text, add_special_tokens=special)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(tokenizer: Any, body: DetokenizeRequest, vocab_size: int | None) -> dict[str, Any]:
    """The text of ``tokens`` (400 for an id outside the vocabulary)."""
    if tokenizer is None:
        raise OpenAIError("this model has no tokenizer")
    limit = vocab_size if vocab_size is not None else len(tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < limit]
    if bad:
        raise OpenAIError(f"token ids {bad[:5]} outside the vocabulary [0, {limit})",
                          param="tokens")
    return {"prompt": str(tokenizer.decode(body.tokens))}


def install_error_handlers(api: FastAPI) -> None:
    """Every HTTP error Starlette raises (404 unknown path, 405 wrong method, ...) answers
    in OpenAI's error shape, with its status."""

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
            code: str | None = "not_found"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        err = OpenAIError(message, exc.status_code, "invalid_request_error", code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)
