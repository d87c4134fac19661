"""Sampler: next token per sequence from the step's logits, per-request settings.

Order of operations per row (logits are float32 ``[num_seqs, vocab_size]``)::

    raw log-softmax (for top-n logprobs)
    -> grammar bitmask (structured output)      | only rows that ask: logits copied once,
    -> logit_bias, min_tokens                   |   the others keep the fast path
    -> presence/frequency penalties over the request's output tokens, repetition penalty
       over prompt + output (vLLM semantics)
    -> greedy: argmax                           | random: / temperature -> top-k -> top-p
                                                |   -> min-p -> softmax -> draw
NOTE: the draw is ``argmax(p / Exp(1))`` (the exponential-race form of sampling from p) with
the request's own torch.Generator when it has a seed, so a seeded request draws the same
numbers whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from replicas.logits_processors import apply_logits_processors
from replicas.outputs import TokenLogprobs
from replicas.request import Request
from replicas.sampling_params import SamplingParams
from replicas.structured_output import GrammarState, apply_token_bitmask, fill_bitmask


@dataclass(slots=True)
class SamplerOutput:
    """One sampled token per input row, plus its top-n logprobs when asked for."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def apply_penalties(
    logits: torch.Tensor,
    output_token_ids: Sequence[int],
    params: SamplingParams,
    prompt_token_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (positive logits / penalty, negative
    * penalty, as vLLM), then ``- frequency * count - presence * [count > 0]`` over the output
    tokens (vocab row; returns a new row)."""
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0 and (output_token_ids or prompt_token_ids):
        seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        for ids in (prompt_token_ids, output_token_ids):
            if ids:
                seen[torch.tensor(ids, dtype=torch.long, device=logits.device)] = True
        penalty = params.repetition_penalty
        logits = torch.where(
            seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits
        )
    if not output_token_ids or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    ids = torch.tensor(output_token_ids, dtype=torch.long, device=logits.device)
    counts = torch.bincount(ids, minlength=vocab)[:vocab].to(logits.dtype)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on one row; masked entries become -inf."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # NOTE: keep a token when the mass BEFORE it is below top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def top_logprobs(raw_logprobs: torch.Tensor, n: int, sampled: int) -> TokenLogprobs:
    """The n most likely tokens' log-probabilities plus the sampled token's."""
    out: TokenLogprobs = {}
    if n > 0:
        values, ids = torch.topk(raw_logprobs, n)
        out = {int(i): float(v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
    out[sampled] = float(raw_logprobs[sampled])
    return out


class Sampler:
    """Stateless apart from the fallback generator for requests without a seed."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @staticmethod
    def _process(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Grammar bitmask and logits processors on the rows that ask for them; ``logits``
        itself is returned untouched when no row does (the common case)."""
        grammar_rows: list[int] = []
        states: list[GrammarState] = []
        processed: list[int] = []
        for i, req in enumerate(requests):
            if req.grammar is not None:
                grammar_rows.append(i)
                states.append(req.grammar)
            if req.params.has_logits_processors:
                processed.append(i)
        if not grammar_rows and not processed:
            return logits
        # NOTE: one copy: the runner's logits may be a captured graph's output buffer.
        logits = logits.clone()
        if grammar_rows:
            apply_token_bitmask(logits, fill_bitmask(states, logits.shape[-1]), grammar_rows)
        for i in processed:
            logits[i] = apply_logits_processors(logits[i], requests[i])
        return logits

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        """logits ``[len(requests), vocab]`` float32 -> one token per request (no mutation)."""
        assert logits.shape[0] == len(requests)
        want_logprobs = any(r.params.logprobs is not None for r in requests)
        raw = logits.log_softmax(-1) if want_logprobs else None
        logits = self._process(logits, requests)
        greedy_rows = [i for i, r in enumerate(requests) if r.params.greedy]
        token_ids = [0] * len(requests)
        if greedy_rows:
            # NOTE: one argmax and one device->host copy for the greedy rows; only rows with
            # penalties get a row op of their own (a per-row loop cost ~10 us a row).
            all_rows = len(greedy_rows) == len(requests)
            rows = logits if all_rows else logits[greedy_rows]
            penalised = [j for j, i in enumerate(greedy_rows) if requests[i].params.has_penalties]
            if penalised:
                rows = rows.clone() if all_rows else rows
                for j in penalised:
                    req = requests[greedy_rows[j]]
                    rows[j] = apply_penalties(
                        rows[j], req.output_token_ids, req.params, req.prompt_token_ids
                    )
            for i, t in zip(greedy_rows, rows.argmax(-1).tolist(), strict=True):
                token_ids[i] = int(t)
        for i, req in enumerate(requests):
            if req.params.greedy:
                continue
            row = apply_penalties(
                logits[i], req.output_token_ids, req.params, req.prompt_token_ids
            )
            probs = filter_logits(row, req.params).softmax(-1)
            gen = req.generator if req.generator is not None else self.generator
            race = torch.empty_like(probs).exponential_(generator=gen)
            token_ids[i] = int((probs / race).argmax())
        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if raw is not None:
            for i, req in enumerate(requests):
                if req.params.logprobs is not None:
                    logprobs[i] = top_logprobs(raw[i], req.params.logprobs, token_ids[i])
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)
