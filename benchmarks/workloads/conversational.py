"""Conversation-shaped workloads: multi-turn chat and llm-d's B2B SaaS benchmark.

Builders follow the conventions of ``shared_prefix`` (``seed``, ``scale = num_replicas / 8``,
``arrival``).
"""

from __future__ import annotations

import math

import numpy as np

from benchmarks.workloads.arrivals import arrival_times, staged_arrival_times
from benchmarks.workloads.types import (
    DEFAULT_BLOCK_SIZE,
    BlockIds,
    SimRequest,
    Workload,
    blocks_for,
)

# NOTE: llm-d's QPS ladder ("QPS swept 3 -> 60" in the issue; llm-d blog "KV-Cache Wins You
# Can See", 2025-09-24). The intermediate steps are ours.
B2B_QPS = (3.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0)


def multi_turn_chat(
    seed: int = 0, scale: float = 1.0, arrival: str = "poisson", *,
    num_clients: int = 256, num_rounds: int = 5, tokens_per_round: int = 512,
    output_len: int = 64, rate: float = 48.0, think_time_s: float = 1.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Workload:
    """SGLang multi-turn bench shape: ``num_clients`` clients each hold a ``num_rounds``-turn
    conversation; every turn appends ``tokens_per_round`` user tokens to the full history
    (previous prompts and answers) and asks for ``output_len`` tokens. Clients start with
    Poisson/gamma arrivals at ``rate``; a turn is sent an exponential think time (mean
    ``think_time_s``) after the previous answer completes (closed loop via ``parent_id``)."""
    rng = np.random.default_rng(seed)
    ids = BlockIds()
    clients = max(1, round(num_clients * scale))
    starts = arrival_times(rng, clients, rate * scale, arrival)
    user_blocks = blocks_for(tokens_per_round, block_size)
    out_blocks = blocks_for(output_len, block_size)
    reqs: list[SimRequest] = []
    for c in range(clients):
        history: tuple[int, ...] = ()
        parent: str | None = None
        for r in range(num_rounds):
            prompt = history + ids.take(user_blocks)
            out = ids.take(out_blocks)
            rid = f"chat-{c}-{r}"
            think = 0.0 if parent is None else float(rng.exponential(think_time_s))
            reqs.append(SimRequest(rid, float(starts[c]), prompt, output_len, out,
                                   session_id=f"client{c}", parent_id=parent,
                                   think_time_s=think))
            history, parent = prompt + out, rid
    params = dict(num_clients=clients, num_rounds=num_rounds, tokens_per_round=tokens_per_round,
                  output_len=output_len, rate=rate * scale, think_time_s=think_time_s,
                  arrival=arrival, source="issue 7 (SGLang multi-turn bench shape)")
    return Workload("multi_turn_chat", seed, reqs, params, block_size=block_size).sort()


def b2b_saas(
    seed: int = 0, scale: float = 1.0, arrival: str = "poisson", *,
    num_tenants: int = 150, context_len: int = 6000, users_per_tenant: int = 5,
    query_len: int = 1200, output_len: int = 128, qps: tuple[float, ...] = B2B_QPS,
    stage_s: float = 10.0, kv_demand: float = 0.73, block_size: int = DEFAULT_BLOCK_SIZE,
) -> Workload:
    """llm-d's B2B SaaS scenario: ``num_tenants`` tenants, each with a ``context_len``-token
    shared context (system prompt + documents), ``users_per_tenant`` users each; every request
    is a random user's fresh ``query_len``-token query after its tenant's context. QPS is swept
    through ``qps`` (scaled), ``stage_s`` seconds per step.

    KV capacity: the pool size per replica is set so that the working set (every tenant context
    plus one query per user: 150 x 6,000 + 750 x 1,200 = 1.8M tokens at scale 1) is
    ``kv_demand`` (73%) of the cluster's KV capacity; at 8 replicas that is ~308k tokens per
    replica, close to a TP2 Qwen3-32B vLLM pod on 2 H100s (llm-d's setup: 16 H100, 8 pods).
    ``output_len`` is ours (the sources we read do not state it)."""
    rng = np.random.default_rng(seed)
    ids = BlockIds()
    tenants = max(1, round(num_tenants * scale))
    contexts = [ids.take(blocks_for(context_len, block_size)) for _ in range(tenants)]
    num_users = tenants * users_per_tenant
    times, stages = staged_arrival_times(rng, [q * scale for q in qps], stage_s, arrival)
    users = rng.integers(0, num_users, size=len(times))
    q_blocks, out_blocks = blocks_for(query_len, block_size), blocks_for(output_len, block_size)
    reqs = [
        SimRequest(f"b2b-{i}", float(t), contexts[u // users_per_tenant] + ids.take(q_blocks),
                   output_len, ids.take(out_blocks), session_id=f"user{u}")
        for i, (t, u) in enumerate(zip(times.tolist(), users.tolist(), strict=True))
    ]
    demand_blocks = tenants * len(contexts[0]) + num_users * q_blocks
    num_replicas = max(1, round(8 * scale))
    kv_blocks = math.ceil(demand_blocks / (kv_demand * num_replicas))
    params = dict(num_tenants=tenants, context_len=context_len,
                  users_per_tenant=users_per_tenant, query_len=query_len, output_len=output_len,
                  qps=[q * scale for q in qps], stage_s=stage_s, kv_demand=kv_demand,
                  design_replicas=num_replicas, arrival=arrival,
                  source="llm-d blog 'KV-Cache Wins You Can See' (2025-09-24) B2B SaaS scenario")
    return Workload("b2b_saas", seed, reqs, params, stages, kv_blocks, block_size).sort()
