"""Shared-prefix workloads: SGLang's generated shared prefix, vLLM's prefix repetition and
sibling bursts (parallel sampling).

Every builder takes ``seed`` (everything random comes from ``numpy.random.default_rng(seed)``),
``scale`` (groups and request rate are multiplied by it: ``scale = num_replicas / 8`` keeps the
per-replica load of the 8-replica design point) and ``arrival`` (``poisson`` or ``gamma``).
Rates are for the 8-replica design point, chosen (by a scan over 1x/1.5x/2x) so that the
calibrated H100 replicas are busy but not saturated under round-robin: at low load every policy
ties on TTFT and the benchmark would measure nothing about routing.
"""

from __future__ import annotations

import numpy as np

from benchmarks.workloads.arrivals import arrival_times
from benchmarks.workloads.types import (
    DEFAULT_BLOCK_SIZE,
    BlockIds,
    SimRequest,
    Workload,
    blocks_for,
)


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def generated_shared_prefix(
    seed: int = 0, scale: float = 1.0, arrival: str = "poisson", *,
    num_groups: int = 64, prompts_per_group: int = 16, system_prompt_len: int = 2048,
    question_len: int = 128, output_len: int = 256, rate: float = 96.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Workload:
    """SGLang ``bench_serving --dataset-name generated-shared-prefix`` defaults: 64 groups x 16
    prompts, 2,048-token system prompt per group, 128-token question, 256-token output;
    requests of all groups shuffled together, then Poisson/gamma arrivals at ``rate``."""
    rng = np.random.default_rng(seed)
    ids = BlockIds()
    groups = _scaled(num_groups, scale)
    prompts: list[tuple[tuple[int, ...], str]] = []
    for g in range(groups):
        system = ids.take(blocks_for(system_prompt_len, block_size))
        for _ in range(prompts_per_group):
            prompts.append((system + ids.take(blocks_for(question_len, block_size)), f"g{g}"))
    order = rng.permutation(len(prompts))
    times = arrival_times(rng, len(prompts), rate * scale, arrival)
    out_blocks = blocks_for(output_len, block_size)
    reqs = [
        SimRequest(f"gsp-{i}", float(times[i]), prompts[j][0], output_len, ids.take(out_blocks),
                   session_id=prompts[j][1])
        for i, j in enumerate(order.tolist())
    ]
    params = dict(num_groups=groups, prompts_per_group=prompts_per_group,
                  system_prompt_len=system_prompt_len, question_len=question_len,
                  output_len=output_len, rate=rate * scale, arrival=arrival,
                  source="SGLang bench_serving generated-shared-prefix defaults (gsp_*)")
    return Workload("generated_shared_prefix", seed, reqs, params, block_size=block_size).sort()


def prefix_repetition(
    seed: int = 0, scale: float = 1.0, arrival: str = "poisson", *,
    num_prefixes: int = 16, num_prompts: int = 1024, prefix_len: int = 512,
    suffix_len: int = 128, output_len: int = 128, rate: float = 192.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Workload:
    """vLLM ``benchmark_serving --dataset-name prefix_repetition``: ``num_prefixes`` random
    prefixes of ``prefix_len`` tokens, each prompt = one prefix (uniform) + a fresh
    ``suffix_len`` suffix; output ``output_len``. Shape from the issue: 512 / 128 / 128."""
    rng = np.random.default_rng(seed)
    ids = BlockIds()
    n_pre = _scaled(num_prefixes, scale)
    n = _scaled(num_prompts, scale)
    prefixes = [ids.take(blocks_for(prefix_len, block_size)) for _ in range(n_pre)]
    choice = rng.integers(0, n_pre, size=n)
    times = arrival_times(rng, n, rate * scale, arrival)
    sfx, out_blocks = blocks_for(suffix_len, block_size), blocks_for(output_len, block_size)
    reqs = [
        SimRequest(f"rep-{i}", float(times[i]), prefixes[p] + ids.take(sfx), output_len,
                   ids.take(out_blocks), session_id=f"p{p}")
        for i, p in enumerate(choice.tolist())
    ]
    params = dict(num_prefixes=n_pre, num_prompts=n, prefix_len=prefix_len,
                  suffix_len=suffix_len, output_len=output_len, rate=rate * scale,
                  arrival=arrival, source="vLLM benchmark_serving prefix_repetition dataset")
    return Workload("prefix_repetition", seed, reqs, params, block_size=block_size).sort()


def sibling_bursts(
    seed: int = 0, scale: float = 1.0, arrival: str = "poisson", *,
    num_problems: int = 16, samples_per_problem: int = 4, num_rounds: int = 8,
    problem_len: int = 1024, output_len: int = 256, rate: float = 24.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Workload:
    """Parallel sampling / tree search: each round, ``num_problems`` problems arrive (at
    ``rate`` problems/s) and each sends ``samples_per_problem`` identical prompts at the SAME
    instant. Siblings land before any KV event of the first one can reach the router, so only
    speculative (pending) inserts or session affinity keep them together."""
    rng = np.random.default_rng(seed)
    ids = BlockIds()
    problems = _scaled(num_problems, scale) * num_rounds
    times = arrival_times(rng, problems, rate * scale, arrival)
    out_blocks = blocks_for(output_len, block_size)
    reqs: list[SimRequest] = []
    for p in range(problems):
        prompt = ids.take(blocks_for(problem_len, block_size))
        for s in range(samples_per_problem):
            reqs.append(SimRequest(f"sib-{p}-{s}", float(times[p]), prompt, output_len,
                                   ids.take(out_blocks), session_id=f"prob{p}"))
    params = dict(num_problems=problems, samples_per_problem=samples_per_problem,
                  problem_len=problem_len, output_len=output_len, rate=rate * scale,
                  arrival=arrival,
                  source="issue 7 shape (16 problems x 4 samples arriving together), per round")
    return Workload("sibling_bursts", seed, reqs, params, block_size=block_size).sort()
