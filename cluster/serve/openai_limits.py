"""Hard input limits of the HTTP API: validated settings and the checks that enforce them.

``LimitSettings`` is the ``limits:`` block of ``deploy/app.yaml`` (``AppConfig.limits``). Each
check raises ``OpenAIError`` (400, or 413 for a body over ``max_body_bytes``) naming the field
and the limit, before the request costs anything: the body before it is parsed, the raw JSON
before it is validated, the prompt's length before it is tokenized where that is decidable.

NOTE: why each limit exists. Every stop string is searched for in every request's new text at
every token, and stop ids are checked per token, so thousands of them slow every request
batched with the sender's; a ``session_id`` travels to the selection service in each Select
(its gRPC limit would turn a huge one into a counted selector outage); an unbounded message
list or body costs the ingress's parse and template time for everyone on its event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cluster.serve.openai_protocol import ChatMessage, OpenAIError

# Fields OpenAI defines that this server does not implement: named in the 400 so a client
# learns why (an unknown name gets the generic "Unrecognized request argument").
NOT_IMPLEMENTED = frozenset({
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "audio",
    "modalities", "prediction", "web_search_options", "reasoning_effort", "store", "metadata",
    "service_tier",
})


class LimitSettings(BaseModel):
    """Per-request limits of the ingress (``limits:`` in ``deploy/app.yaml``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(
        default=2 * 1024 * 1024, ge=1024, description="Largest request body (413 above)."
    )
    max_prompt_tokens: int = Field(
        default=32768, ge=1, description="Largest prompt in tokens, after the chat template."
    )
    max_messages: int = Field(default=1024, ge=1, description="Most chat messages per request.")
    max_stop: int = Field(default=16, ge=0, description="Most stop strings per request.")
    max_stop_chars: int = Field(default=256, ge=1, description="Longest stop string (chars).")
    max_stop_token_ids: int = Field(default=64, ge=0, description="Most stop_token_ids.")
    max_session_id_chars: int = Field(default=256, ge=1, description="Longest session_id.")


def check_body_size(content_length: str | None, settings: LimitSettings) -> None:
    """413 when the declared body size is over the limit (a missing or bad header passes: the
    body is then counted while it is read, ``check_body_bytes``)."""
    try:
        size = int(content_length) if content_length is not None else 0
    except ValueError:
        return
    check_body_bytes(size, settings)


def check_body_bytes(size: int, settings: LimitSettings) -> None:
    if size > settings.max_body_bytes:
        raise OpenAIError(
            f"request body of {size} bytes is over the limit of {settings.max_body_bytes}",
            status_code=413,
            code="request_too_large",
        )


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def check_raw(data: Mapping[str, Any], known: Mapping[str, Any], settings: LimitSettings) -> None:
    """Checks on the parsed JSON object before model validation: text that is not valid
    Unicode, fields this server does not know or implement (``known``: the request model's
    fields), the message list (count, per-message fields)."""
    if _has_lone_surrogate(data):
        raise OpenAIError("request holds a lone UTF-16 surrogate: not valid Unicode text")
    for name, value in data.items():
        if _empty(value) and (name in NOT_IMPLEMENTED or name not in known):
            continue  # NOTE: null / [] / {} asks for nothing (clients echo such defaults)
        if name in NOT_IMPLEMENTED:
            raise OpenAIError(f"{name} is not supported by this server", param=name)
        if name not in known:
            raise OpenAIError(f"Unrecognized request argument supplied: {name}", param=name)
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > settings.max_messages:
            raise OpenAIError(
                f"{len(messages)} messages are over the limit of {settings.max_messages}",
                param="messages",
            )
        for i, msg in enumerate(messages):
            for name, value in msg.items() if isinstance(msg, dict) else ():
                if name not in ChatMessage.model_fields and not _empty(value):
                    raise OpenAIError(
                        f"messages[{i}].{name} is not supported by this server",
                        param=f"messages[{i}].{name}",
                    )


def check_params(
    stop: str | list[str] | None,
    stop_token_ids: list[int],
    session_id: str | None,
    vocab_size: int | None,
    settings: LimitSettings,
) -> None:
    """Limits of the validated fields shared by both endpoints."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > settings.max_stop:
        raise OpenAIError(
            f"{len(stops)} stop strings are over the limit of {settings.max_stop}", param="stop"
        )
    if any(len(s) > settings.max_stop_chars for s in stops):
        raise OpenAIError(
            f"a stop string is longer than {settings.max_stop_chars} characters", param="stop"
        )
    if len(stop_token_ids) > settings.max_stop_token_ids:
        raise OpenAIError(
            f"{len(stop_token_ids)} stop_token_ids are over the limit of "
            f"{settings.max_stop_token_ids}",
            param="stop_token_ids",
        )
    check_token_ids(stop_token_ids, vocab_size, "stop_token_ids")
    if session_id is not None and len(session_id) > settings.max_session_id_chars:
        raise OpenAIError(
            f"session_id is longer than {settings.max_session_id_chars} characters",
            param="session_id",
        )


def check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    """Every id must name a token of the vocabulary (``0 <= id < vocab_size``)."""
    bad = next((i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)), None)
    if bad is not None:
        raise OpenAIError(
            f"token id {bad} is out of the vocabulary [0, {vocab_size})", param=param
        )


def check_prompt_tokens(num_tokens: int, settings: LimitSettings, param: str = "prompt") -> None:
    if num_tokens > settings.max_prompt_tokens:
        raise OpenAIError(
            f"the prompt has {num_tokens} tokens, over the limit of {settings.max_prompt_tokens}",
            param=param,
        )


def check_prompt_chars(num_chars: int, max_token_chars: int, settings: LimitSettings,
                       param: str = "prompt") -> None:
    """Refuse, without tokenizing, a text that cannot fit ``max_prompt_tokens``: no token
    covers more than ``max_token_chars`` characters, so it holds at least
    ``num_chars / max_token_chars`` tokens."""
    at_least = -(-num_chars // max(max_token_chars, 1))
    if at_least > settings.max_prompt_tokens:
        raise OpenAIError(
            f"the prompt has at least {at_least} tokens ({num_chars} characters), over the "
            f"limit of {settings.max_prompt_tokens}",
            param=param,
        )


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` decodes to (1 without a tokenizer)."""
    if tokenizer is None:
        return 1
    vocab = tokenizer.get_vocab()
    longest = max((len(t) for t in vocab), default=1)
    # NOTE: byte-level vocabularies spell a space as one char ("Ġ"): the token text is never
    # shorter than what it decodes to, so the raw length is a safe upper bound.
    return max(longest, 1)
