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
numbers whatever it is batched with. ``sample`` keeps the tokens on the device (no host sync
on the greedy and random paths; penalties, grammar masks and logits processors copy host
lists); ``__call__`` brings them to the host (``replicas.sampled_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from replicas.logits_processors import apply_logits_processors
from replicas.request import Request
from replicas.sampled_tokens import DeviceSample, SamplerOutput, logprob_groups
from replicas.sampling_params import SamplingParams
from replicas.structured_output import GrammarState, apply_token_bitmask, fill_bitmask

__all__ = ["Sampler", "SamplerOutput", "apply_penalties", "filter_logits"]


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


class Sampler:
    """Stateless apart from the fallback generator for requests without a seed."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @staticmethod
    def _process(
        logits: torch.Tensor, requests: Sequence[Request], num_output_tokens: Sequence[int]
    ) -> torch.Tensor:
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
            logits[i] = apply_logits_processors(logits[i], requests[i], num_output_tokens[i])
        return logits

    def sample(
        self,
        logits: torch.Tensor,
        requests: Sequence[Request],
        num_output_tokens: Sequence[int] | None = None,
    ) -> DeviceSample:
        """logits ``[len(requests), vocab]`` float32 -> one token per request, left on the
        logits' device (no mutation of ``logits``). ``num_output_tokens``: each row's outputs
        before the sampled one (min_tokens), default the requests' own counts (a request with
        a token still on the device is one short of it)."""
        assert logits.shape[0] == len(requests)
        counts = (
            [r.num_output_tokens for r in requests]
            if num_output_tokens is None
            else list(num_output_tokens)
        )
        want_logprobs = any(r.params.logprobs is not None for r in requests)
        raw = logits.log_softmax(-1) if want_logprobs else None
        logits = self._process(logits, requests, counts)
        # NOTE: one argmax over every row (the random rows' results are overwritten below):
        # selecting the greedy rows by a host index list would copy it synchronously.
        penalised = [
            i for i, r in enumerate(requests) if r.params.greedy and r.params.has_penalties
        ]
        rows = logits.clone() if penalised else logits
        for i in penalised:
            req = requests[i]
            rows[i] = apply_penalties(rows[i], req.output_token_ids, req.params, req.prompt_token_ids)
        token_ids = rows.argmax(-1)
        for i, req in enumerate(requests):
            if req.params.greedy:
                continue
            row = apply_penalties(
                logits[i], req.output_token_ids, req.params, req.prompt_token_ids
            )
            probs = filter_logits(row, req.params).softmax(-1)
            gen = req.generator if req.generator is not None else self.generator
            race = torch.empty_like(probs).exponential_(generator=gen)
            token_ids[i] = (probs / race).argmax()
        groups = []
        if raw is not None:
            groups = logprob_groups(raw, token_ids, [r.params.logprobs for r in requests])
        return DeviceSample(token_ids, groups)

    def __call__(
        self,
        logits: torch.Tensor,
        requests: Sequence[Request],
        num_output_tokens: Sequence[int] | None = None,
    ) -> SamplerOutput:
        """``sample`` and bring the result to the host (waits for the device)."""
        return self.sample(logits, requests, num_output_tokens).to_host().output()
