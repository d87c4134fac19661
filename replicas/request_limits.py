"""RequestLimits: what an engine admits, checked wherever a request enters.

The engine core checks a request again when it adds it; the async facade checks it first, in
the caller's thread, so a bad request raises ``ValueError`` from ``generate`` before anything
is queued. With the engine core in its own process the facade has no ``LLMEngine``: the child
sends these numbers once, when it is ready (``replicas.engine_core_wire.Ready``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from replicas.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The model's and the pool's limits on one request."""

    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int
    has_tokenizer: bool

    def check(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError naming the violated limit; changes nothing."""
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty: at least one prompt token is required")
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})"
            )
        params.validate(self.vocab_size)
        if params.stop and not self.has_tokenizer:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{total} exceeds max_model_len {self.max_model_len}"
            )
        # NOTE: the last sampled token never needs a KV slot.
        need = -(-(total - 1) // self.block_size)
        if need > self.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks ({total - 1} tokens) but the pool has only "
                f"num_blocks={self.num_blocks} of block_size={self.block_size}"
            )
