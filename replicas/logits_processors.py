"""Per-row logits processors for vLLM's knobs: ``logit_bias`` and ``min_tokens``.

Run by the sampler on the rows whose request asks for one (``SamplingParams.
has_logits_processors``), after the grammar bitmask and before penalties and temperature;
rows without them never reach this module (the sampler's greedy fast path stays one argmax).
"""

from __future__ import annotations

import torch

from replicas.request import Request


def apply_logit_bias(row: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """``row[token] += bias[token]`` for every biased token (returns a new row)."""
    if not bias:
        return row
    ids = torch.tensor(list(bias), dtype=torch.long, device=row.device)
    values = torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device)
    return row.index_add(0, ids, values)


def min_tokens_blocked(req: Request, num_output_tokens: int | None = None) -> list[int]:
    """Token ids that may not be sampled yet: EOS (unless ignored) and ``stop_token_ids`` while
    the request has fewer than ``min_tokens`` outputs, as vLLM's MinTokensLogitsProcessor.
    ``num_output_tokens``: the outputs before this sample (default the request's count; the
    asynchronous engine passes it, a token of its may still be on the device)."""
    params = req.params
    count = req.num_output_tokens if num_output_tokens is None else num_output_tokens
    if count >= params.min_tokens:
        return []
    blocked = set(params.stop_token_ids)
    if not params.ignore_eos:
        blocked |= req.eos_token_ids
    return sorted(blocked)


def apply_logits_processors(
    row: torch.Tensor, req: Request, num_output_tokens: int | None = None
) -> torch.Tensor:
    """logit_bias then min_tokens on one ``[vocab_size]`` row (returns a new row)."""
    row = apply_logit_bias(row, req.params.logit_bias)
    blocked = [t for t in min_tokens_blocked(req, num_output_tokens) if t < row.shape[-1]]
    if blocked:
        row = row.index_fill(0, torch.tensor(blocked, device=row.device), float("-inf"))
    return row
