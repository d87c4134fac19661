"""SamplingParams: per-request decoding settings (OpenAI/vLLM names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# NOTE: temperatures below this are treated as greedy (argmax), as in vLLM.
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    """What the output must match: ``json_object`` (any JSON object) or ``json_schema``
    (``schema`` is the JSON Schema as a canonical JSON string, so it hashes as a cache key)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None


@dataclass(slots=True)
class SamplingParams:
    """Decoding settings of one request.

    temperature 0 = greedy. top_k 0 or -1 = off; top_p 1 = off; min_p 0 = off. ``seed`` makes
    the request's random draws reproducible whatever else is batched with it. Penalties apply
    to the request's OUTPUT tokens (OpenAI semantics). ``stop`` strings end generation and are
    cut from the text; ``stop_token_ids`` end it too (the id stays in new_token_ids).
    ``logprobs`` = n returns the n most likely tokens' log-probabilities (plus the sampled
    one) per generated token, from the raw model distribution.

    vLLM's logits knobs: ``logit_bias`` (token id -> added to its logit, [-100, 100]);
    ``min_tokens`` (EOS, ``stop_token_ids`` and stop strings cannot end the output before it);
    ``repetition_penalty`` (> 1 discourages every token of prompt + output: positive logits
    divided by it, negative multiplied; 1 = off). ``structured_output`` constrains the output to
    a grammar (``replicas.structured_output``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    structured_output: StructuredOutputSpec | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def has_logits_processors(self) -> bool:
        """True when a row needs logit_bias or min_tokens (the sampler's fast path skips it)."""
        return bool(self.logit_bias) or self.min_tokens > 0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first invalid field and its allowed range."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        bias = [v for v in self.logit_bias.values() if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS]
        if bias:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias[0]}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"stop_token_ids {bad} outside the vocabulary [0, {vocab_size})")
            bad = [t for t in self.logit_bias if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"logit_bias token ids {bad[:5]} outside [0, {vocab_size})")
