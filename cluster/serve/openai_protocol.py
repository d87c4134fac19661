"""OpenAI API request models and their mapping onto the engine's SamplingParams.

Only what the engine can honour is accepted: ``best_of`` other than ``n``, ``echo``, tools
and non-text message parts are refused with a 400 naming the field (never silently ignored).
Unknown extra fields are ignored, as OpenAI's own server does. ``n`` (1-16 sequences sharing
the prompt's blocks), ``response_format`` (``cluster.serve.openai_formats``) and ``logit_bias`` are
served; vLLM's sampling extensions (``top_k``, ``min_p``, ``ignore_eos``, ``stop_token_ids``,
``min_tokens``, ``repetition_penalty``) are accepted too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.serve.openai_formats import ResponseFormat, logit_bias_ids
from replicas.parallel_sampling import MAX_N
from replicas.sampling_params import SamplingParams


class OpenAIError(Exception):
    """An error the ingress turns into OpenAI's error body with ``status_code``."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.err_type = err_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}`` exactly as OpenAI's API returns it."""
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints (OpenAI names; vLLM extensions at the end)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    response_format: ResponseFormat | None = None
    session_id: str | None = None
    # NOTE: A/B routing: the selection-service policy for this request (cluster.selector.policy names);
    # None = the router's configured policy. Checked by the ingress against the registry.
    routing_policy: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                "stream_options is only allowed with stream=true", param="stream_options"
            )

    def _sampling(
        self, max_tokens: int | None, default_max_tokens: int, logprobs: int | None
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            bias = logit_bias_ids(self.logit_bias)
            structured = self.response_format.spec() if self.response_format else None
        except ValueError as exc:
            param = "logit_bias" if "logit_bias" in str(exc) else "response_format"
            raise OpenAIError(str(exc), param=param) from exc
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            logit_bias=bias,
            min_tokens=self.min_tokens,
            repetition_penalty=self.repetition_penalty,
            structured_output=structured,
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message as plain text; only ``{"type": "text"}`` parts are accepted."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts: list[str] = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(
                    f"unsupported content part type {part.get('type')!r}; only 'text' parts",
                    param="messages",
                )
            parts.append(part["text"])
        return "".join(parts)


def _num_chars(content: Any) -> int:
    """Text characters in a prompt or message content of any accepted shape (str, token ids,
    lists of those, content parts); anything else counts 0 (validation refuses it later)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, dict):
        text = content.get("text")
        return len(text) if isinstance(text, str) else 0
    if isinstance(content, list):
        return sum(1 if isinstance(x, int) else _num_chars(x) for x in content)
    return 0


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise OpenAIError("tools are not supported by this server", param="tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        limit = self.max_completion_tokens if self.max_completion_tokens else self.max_tokens
        n_logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(limit, default_max_tokens, n_logprobs)

    def num_prompt_chars(self) -> int:
        """Characters of the messages' text: what tokenizing them costs, roughly (the
        ingress's inline-or-thread choice). Never raises; ``chat()`` checks the parts."""
        return sum(_num_chars(m.content) for m in self.messages)

    def chat(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them (``developer`` maps to ``system``)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise OpenAIError("echo is not supported", param="echo")
        # NOTE: best_of > n is refused, as vLLM v1 does: it would need n sequences ranked by
        # cumulative logprob and the rest thrown away.
        if self.best_of not in (None, self.n):
            raise OpenAIError("best_of must equal n (or be left out)", param="best_of")
        if self.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")

    def num_prompt_chars(self) -> int:
        """Characters of the prompt (a token id counts as one: decoding it is as cheap), for
        the ingress's inline-or-thread tokenization choice."""
        return _num_chars(self.prompt)

    def single_prompt(self) -> str | list[int]:
        """The one prompt (text or token ids); batches of several prompts are refused."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise OpenAIError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [int(x) for x in p]  # type: ignore[arg-type]
        if len(p) == 1:
            only = p[0]
            return only if isinstance(only, str) else [int(x) for x in only]  # type: ignore[union-attr]
        raise OpenAIError("only one prompt per request is supported", param="prompt")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        # NOTE: OpenAI's legacy completions API defaults to 16 tokens, whatever the server's
        # default for chat; ``default_max_tokens`` is accepted for a uniform call site.
        del default_max_tokens
        return self._sampling(self.max_tokens, 16, self.logprobs)
