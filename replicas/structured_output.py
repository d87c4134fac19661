"""Structured output: JSON grammars compiled by xgrammar, applied to the logits as a token bitmask.

    ingress: response_format -> SamplingParams.structured_output (StructuredOutputSpec)
    AsyncLLMEngine._stream:  GrammarCompiler.compile(spec)   on a worker thread, cached per spec
                             (bad schema -> ValueError -> 400, before anything is scheduled)
    LLMEngine.add_request:   GrammarState(compiled)          one matcher per sequence
    Sampler:                 fill_bitmask(rows) -> apply_token_bitmask(logits, bitmask, rows)
    LLMEngine._step:         state.accept(token_id)          after sampling

Bitmask layout (xgrammar's): int32 ``[num_rows, ceil(vocab_size / 32)]``; bit ``j`` of word
``w`` set = token ``32 * w + j`` allowed. ``apply_token_bitmask`` unpacks it with plain torch
ops, so the same code masks CPU and CUDA logits (one host->device copy of the packed words).

NOTE: compiling a schema takes milliseconds to seconds (it walks the whole vocabulary), so it
never runs on the engine-core thread: a step would stall every sequence in the batch. Matching
(``fill_next_token_bitmask``) is microseconds per row and runs in the step.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from replicas.sampling_params import StructuredOutputSpec

if TYPE_CHECKING:
    import xgrammar

MAX_CACHED_GRAMMARS = 128
# NOTE: "any JSON object", as vLLM compiles response_format json_object.
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def canonical_schema(schema: Any) -> str:
    """A JSON Schema as the compact string that keys the grammar cache.

    NOTE: keys keep their order (no sort_keys): the grammar emits ``properties`` in the
    schema's order."""
    return json.dumps(schema, separators=(",", ":"))


class GrammarCompiler:
    """Compiles specs against one tokenizer; thread-safe; keeps the last
    ``MAX_CACHED_GRAMMARS`` compiled grammars (a schema sent again costs a dict lookup)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        if tokenizer is None:
            raise ValueError("structured output needs a tokenizer; this checkpoint has none")
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._cache: OrderedDict[StructuredOutputSpec, xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputSpec) -> xgrammar.CompiledGrammar:
        """The compiled grammar of ``spec``; ValueError naming the problem for a bad schema."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        schema = JSON_OBJECT_SCHEMA if spec.kind == "json_object" else spec.schema
        if schema is None:
            raise ValueError("response_format json_schema needs a schema")
        try:
            # NOTE: compact JSON (no free whitespace): a small model given free whitespace
            # can pad forever instead of closing the object.
            compiled = self._compiler.compile_json_schema(
                schema, any_whitespace=False, strict_mode=True
            )
        except RuntimeError as exc:
            reason = str(exc).rsplit(": ", 1)[-1].strip() or "rejected"
            raise ValueError(f"response_format: invalid JSON schema: {reason}") from exc
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled


class GrammarState:
    """One sequence's position in its grammar (owned by its Request; engine thread only)."""

    __slots__ = ("matcher", "num_rejected")

    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.num_rejected = 0

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (a CPU int32 tensor)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False when the grammar refuses it (then unchanged)."""
        ok = bool(self.matcher.accept_token(token_id))
        self.num_rejected += not ok
        return ok

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


def fill_bitmask(states: Sequence[GrammarState], vocab_size: int) -> torch.Tensor:
    """The packed allowed-token masks of ``states``, one row each (CPU int32)."""
    bitmask = torch.full((len(states), bitmask_words(vocab_size)), -1, dtype=torch.int32)
    for row, state in enumerate(states):
        state.fill(bitmask, row)
    return bitmask


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[rows, words]`` int32 -> ``[rows, vocab_size]`` bool (True = allowed); any device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.flatten(1)[:, :vocab_size].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Set the disallowed tokens of ``logits[rows]`` to -inf, in place.

    logits: ``[num_seqs, vocab_size]`` float (CPU or CUDA); bitmask: ``[len(rows), words]``
    int32 on any device (copied to the logits' device once)."""
    assert bitmask.shape[0] == len(rows), "one bitmask row per masked logits row"
    vocab = logits.shape[-1]
    allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), vocab)
    if len(rows) == logits.shape[0] and list(rows) == list(range(len(rows))):
        logits.masked_fill_(~allowed, float("-inf"))
        return
    idx = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
