"""Parallel sampling (OpenAI ``n``): one request fans out into ``n`` sequences of one prompt.

    request_id "r", n=3  ->  engine requests "r#0", "r#1", "r#2"  (queued in ONE hand-over)

The children are admitted in the same step, and the scheduler hashes a chunk's full blocks
when it schedules it, so children #1.. hit the blocks child #0 computes in that very step:
the prompt's full blocks are prefilled once and shared (ref counts), only the partial last
block is computed per child; the sequences diverge at decode. Outputs carry ``index`` (the
choice index). As vLLM's parallel sampling, child ``i`` of a seeded request draws with
``seed + i``, so the n samples differ and each is reproducible.
"""

from __future__ import annotations

import dataclasses

from replicas.sampling_params import SamplingParams

MAX_N = 16


def child_request_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Child ``index``'s settings: the parent's, with ``seed + index`` when seeded."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def check_n(n: int) -> None:
    """ValueError unless 1 <= n <= MAX_N."""
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}], got {n}")
