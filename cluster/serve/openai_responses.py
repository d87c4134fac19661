"""OpenAI response bodies and SSE chunks built from the engine's RequestOutput deltas.

Pure functions of their inputs (no Ray, no HTTP), so the wire format is unit-tested on its own.
``usage.prompt_tokens_details.cached_tokens`` is the engine's ``num_cached_tokens``: the
prompt tokens whose K/V came from the replica's prefix cache. With ``n`` > 1 every choice
has its own ``Accumulated``; usage counts the prompt once (the first sequence's prompt and
cache hit, as OpenAI counts one prompt) and the completion tokens of every choice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from replicas.outputs import RequestOutput, TokenLogprobs

Endpoint = Literal["chat", "completion"]


def usage(num_prompt_tokens: int, num_output_tokens: int, num_cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": num_prompt_tokens + num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def _token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id])) if tokenizer is not None else str(token_id)


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[TokenLogprobs], top_n: int
) -> dict[str, Any]:
    """``choices[].logprobs`` of the chat API: one entry per generated token."""
    content = []
    for tid, lp in zip(token_ids, logprobs, strict=False):
        text = _token_text(tokenizer, tid)
        top = sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]
        content.append(
            {
                "token": text,
                "logprob": lp.get(tid, float("-inf")),
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": (t := _token_text(tokenizer, k)),
                        "logprob": v,
                        "bytes": list(t.encode()),
                    }
                    for k, v in top
                ],
            }
        )
    return {"content": content}


def completion_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[TokenLogprobs], text_offset: int
) -> dict[str, Any]:
    """``choices[].logprobs`` of the legacy completions API (parallel lists)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tid, lp in zip(token_ids, logprobs, strict=False):
        text = _token_text(tokenizer, tid)
        tokens.append(text)
        token_lps.append(lp.get(tid, float("-inf")))
        tops.append({_token_text(tokenizer, k): v for k, v in lp.items()})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


@dataclass(slots=True)
class Accumulated:
    """A whole (non-streamed) generation folded from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text += out.text_delta
        self.token_ids.extend(out.new_token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        self.finish_reason = out.finish_reason if out.finished else self.finish_reason
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.num_output_tokens = out.num_output_tokens


def usage_of(accs: Accumulated | Sequence[Accumulated]) -> dict[str, Any]:
    """Usage of one response: the prompt once, the outputs of every choice."""
    accs = [accs] if isinstance(accs, Accumulated) else list(accs)
    first = accs[0]
    return usage(
        first.num_prompt_tokens,
        sum(a.num_output_tokens for a in accs),
        first.num_cached_tokens,
    )


@dataclass(slots=True)
class ResponseContext:
    """What every body/chunk of one response repeats."""

    endpoint: Endpoint
    response_id: str
    model: str
    tokenizer: Any
    logprobs: int | None  # top-n per token, None = not requested
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object_name(self) -> str:
        return "chat.completion" if self.endpoint == "chat" else "text_completion"

    def _logprobs(self, token_ids: list[int], lps: list[TokenLogprobs], offset: int) -> Any:
        if self.logprobs is None or not lps:
            return None
        if self.endpoint == "chat":
            return chat_logprobs(self.tokenizer, token_ids, lps, self.logprobs)
        return completion_logprobs(self.tokenizer, token_ids, lps, offset)

    def body(self, accs: Accumulated | Sequence[Accumulated]) -> dict[str, Any]:
        """The full non-streamed response (one ``Accumulated`` per choice, by index)."""
        accs = [accs] if isinstance(accs, Accumulated) else list(accs)
        choices = []
        for index, acc in enumerate(accs):
            choice: dict[str, Any] = {
                "index": index,
                "finish_reason": acc.finish_reason,
                "logprobs": self._logprobs(acc.token_ids, acc.logprobs, 0),
            }
            if self.endpoint == "chat":
                choice["message"] = {"role": "assistant", "content": acc.text}
            else:
                choice["text"] = acc.text
            choices.append(choice)
        return {
            "id": self.response_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_of(accs),
        }

    def chunk(
        self,
        text: str,
        token_ids: list[int] | None = None,
        lps: list[TokenLogprobs] | None = None,
        finish_reason: str | None = None,
        first: bool = False,
        text_offset: int = 0,
        index: int = 0,
    ) -> dict[str, Any]:
        """One streamed choice delta (``usage`` left to ``usage_chunk``)."""
        choice: dict[str, Any] = {
            "index": index,
            "finish_reason": finish_reason,
            "logprobs": self._logprobs(token_ids or [], lps or [], text_offset),
        }
        if self.endpoint == "chat":
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def usage_chunk(self, acc: Accumulated | Sequence[Accumulated]) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: empty choices plus usage."""
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_of(acc),
        }


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"
