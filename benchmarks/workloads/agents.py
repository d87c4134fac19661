"""Agent, tool-use and long-document workloads: a Mooncake-shaped tool-agent trace, a
Preble ToolBench-like workload and a LooGLE-like long-document QA workload.

Builders follow the conventions of ``shared_prefix`` (``seed``, ``scale = num_replicas / 8``,
``arrival``).
"""

from __future__ import annotations

import numpy as np

from benchmarks.workloads.arrivals import arrival_times, zipf_weights
from benchmarks.workloads.types import (
    DEFAULT_BLOCK_SIZE,
    BlockIds,
    SimRequest,
    Workload,
    blocks_for,
)

# NOTE: Mooncake traces name KV content by ``hash_ids`` of 512-token blocks; we keep that
# granularity for the tool-agent trace (one hash id = 512 // block_size of our blocks).
MOONCAKE_HASH_TOKENS = 512


def tool_agent(
    seed: int = 0, scale: float = 1.0, arrival: str = "gamma", *,
    num_agents: int = 64, num_sessions: int = 480, mean_calls: float = 2.0,
    prefix_hash_ids: tuple[int, int] = (1, 6), observation_hash_ids: tuple[int, int] = (3, 9),
    output_len: tuple[int, int] = (64, 320), zipf: float = 1.0, rate: float = 10.0,
    tool_latency_s: float = 0.5, block_size: int = DEFAULT_BLOCK_SIZE,
) -> Workload:
    """Tool-agent trace shaped like Mooncake's (FAST'25 toolagent trace: prompts as 512-token
    ``hash_ids``, ~59% of prompt blocks reusable, bursty arrivals). ``num_agents`` agent types
    each own a system+tool-schema prefix of ``prefix_hash_ids`` hash ids (Zipf popularity);
    a session calls the model a geometric number of times (mean ``mean_calls``); each call's
    prompt = agent prefix + the session history (previous prompt and answer) + a fresh tool
    observation. Sessions start with gamma (BurstGPT-like) arrivals at ``rate``; the next call
    follows the previous answer after an exponential tool latency (closed loop). Defaults give
    an ideal cache ratio of 0.55-0.61 and ~8k-token prompts (seeds 0-1), ~190-token outputs."""
    rng = np.random.default_rng(seed)
    ids = BlockIds()
    per_hash = max(1, MOONCAKE_HASH_TOKENS // block_size)
    agents = [
        ids.take(per_hash * int(rng.integers(prefix_hash_ids[0], prefix_hash_ids[1] + 1)))
        for _ in range(num_agents)
    ]
    popularity = zipf_weights(num_agents, zipf)
    sessions = max(1, round(num_sessions * scale))
    starts = arrival_times(rng, sessions, rate * scale, arrival)
    reqs: list[SimRequest] = []
    for s in range(sessions):
        agent = int(rng.choice(num_agents, p=popularity))
        history: tuple[int, ...] = agents[agent]
        parent: str | None = None
        for c in range(int(rng.geometric(1.0 / mean_calls))):
            obs = per_hash * int(rng.integers(observation_hash_ids[0], observation_hash_ids[1] + 1))
            prompt = history + ids.take(obs)
            n_out = int(rng.integers(output_len[0], output_len[1] + 1))
            out = ids.take(blocks_for(n_out, block_size))
            rid = f"agent-{s}-{c}"
            think = 0.0 if parent is None else float(rng.exponential(tool_latency_s))
            reqs.append(SimRequest(rid, float(starts[s]), prompt, n_out, out,
                                   session_id=f"session{s}", parent_id=parent,
                                   think_time_s=think))
            history, parent = prompt + out, rid
    params = dict(num_agents=num_agents, num_sessions=sessions, mean_calls=mean_calls,
                  prefix_hash_ids=prefix_hash_ids, observation_hash_ids=observation_hash_ids,
                  output_len=output_len, zipf=zipf, rate=rate * scale, arrival=arrival,
                  source="Mooncake FAST'25 toolagent trace shape (hash_ids of 512 tokens, ~59% "
                         "cache ratio); generated, not the trace itself")
    return Workload("tool_agent", seed, reqs, params, block_size=block_size).sort()


def toolbench(
    seed: int = 0, scale: float = 1.0, arrival: str = "poisson", *,
    num_tools: int = 300, num_requests: int = 2048, prefix_len: tuple[int, int] = (1000, 2000),
    query_len: tuple[int, int] = (64, 192), output_len: tuple[int, int] = (16, 64),
    zipf: float = 0.8, rate: float = 80.0, block_size: int = DEFAULT_BLOCK_SIZE,
) -> Workload:
    """ToolBench-like (Preble, arXiv:2407.00023, §2 workload study): ``num_tools`` prefix
    patterns (tool instructions + API docs) with Zipf popularity, each request = one tool's
    prefix + a short user query, short outputs. Lengths are our reading of Preble's shape
    (long shared prompt, short generation), not its exact table."""
    rng = np.random.default_rng(seed)
    ids = BlockIds()
    tools = [ids.take(blocks_for(int(rng.integers(*prefix_len)), block_size))
             for _ in range(num_tools)]
    n = max(1, round(num_requests * scale))
    choice = rng.choice(num_tools, size=n, p=zipf_weights(num_tools, zipf))
    times = arrival_times(rng, n, rate * scale, arrival)
    reqs: list[SimRequest] = []
    for i, t in enumerate(choice.tolist()):
        q = blocks_for(int(rng.integers(*query_len)), block_size)
        n_out = int(rng.integers(*output_len))
        reqs.append(SimRequest(f"tool-{i}", float(times[i]), tools[t] + ids.take(q), n_out,
                               ids.take(blocks_for(n_out, block_size)), session_id=f"tool{t}"))
    params = dict(num_tools=num_tools, num_requests=n, prefix_len=prefix_len,
                  query_len=query_len, output_len=output_len, zipf=zipf, rate=rate * scale,
                  arrival=arrival, source="Preble (arXiv:2407.00023) ToolBench workload shape")
    return Workload("toolbench", seed, reqs, params, block_size=block_size).sort()


def long_doc_qa(
    seed: int = 0, scale: float = 1.0, arrival: str = "poisson", *,
    num_docs: int = 30, doc_len: tuple[int, int] = (28_000, 36_000),
    questions_per_doc: tuple[int, int] = (6, 14), question_len: tuple[int, int] = (32, 128),
    output_len: tuple[int, int] = (16, 64), rate: float = 2.5,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Workload:
    """LooGLE-like long-document QA (as used by Preble): ``num_docs`` documents of ~32k tokens,
    several questions each; prompt = document + question; questions of all documents are
    shuffled together and arrive at ``rate``."""
    rng = np.random.default_rng(seed)
    ids = BlockIds()
    docs = max(1, round(num_docs * scale))
    prompts: list[tuple[tuple[int, ...], int]] = []
    for d in range(docs):
        doc = ids.take(blocks_for(int(rng.integers(*doc_len)), block_size))
        for _ in range(int(rng.integers(questions_per_doc[0], questions_per_doc[1] + 1))):
            q = blocks_for(int(rng.integers(*question_len)), block_size)
            prompts.append((doc + ids.take(q), d))
    order = rng.permutation(len(prompts))
    times = arrival_times(rng, len(prompts), rate * scale, arrival)
    reqs: list[SimRequest] = []
    for i, j in enumerate(order.tolist()):
        n_out = int(rng.integers(*output_len))
        prompt, d = prompts[j]
        reqs.append(SimRequest(f"doc-{i}", float(times[i]), prompt, n_out,
                               ids.take(blocks_for(n_out, block_size)), session_id=f"doc{d}"))
    params = dict(num_docs=docs, doc_len=doc_len, questions_per_doc=questions_per_doc,
                  question_len=question_len, output_len=output_len, rate=rate * scale,
                  arrival=arrival, source="LooGLE long-dependency QA shape (Preble's LooGLE "
                                          "workload); 30 docs of ~32k tokens")
    return Workload("long_doc_qa", seed, reqs, params, block_size=block_size).sort()
