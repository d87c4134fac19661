"""gpu_ab's run plan, pure: the policies and workloads it replays (``POLICIES``, ``PLAN``), how
replicas share GPUs, whether their KV pools fit, the order of the replays, and the time budget
that trims them (``benchmarks.gpu_ab``)."""

from __future__ import annotations

import time
from typing import Any

# label -> (Serve router, the selection-service policy the requests ask for)
POLICIES: dict[str, tuple[str, str]] = {
    "tinyserve": ("tinyserve", "tinyserve"),
    "sglang_cache_aware": ("tinyserve", "sglang_cache_aware"),
    "dynamo_cost": ("tinyserve", "dynamo_cost"),
    "llmd_weighted": ("tinyserve", "llmd_weighted"),
    "ray_prefix_affinity": ("prefix_cache_affinity", ""),
    "pow2": ("pow2", ""),
}
DEFAULT_POLICIES = ["tinyserve", "sglang_cache_aware", "dynamo_cost", "ray_prefix_affinity", "pow2"]
# workload -> scale at 2 replicas (x replicas/2; 8 replicas = 1 is the design point), rate
# multiplier (1 = the design rate), builder overrides
PLAN: dict[str, tuple[float, float, dict[str, Any]]] = {
    "generated_shared_prefix": (0.5, 3.0, {}),
    "multi_turn_chat": (0.5, 4.0, {}),
    "tool_agent": (0.25, 12.0, {}),
    "b2b_saas": (0.25, 4.0, {"stage_s": 4.0}),
}


def gpu_plan(replicas: int, gpus: int) -> dict[str, Any]:
    """Ray's GPU resources: one replica per GPU while there are enough GPUs, else the replicas
    share them, ``ceil(replicas / gpus)`` to a GPU (Ray places a fractional request on ONE GPU,
    so 3 replicas on 2 GPUs take 0.5 each, not 0.67, which would leave the third unplaced)."""
    if replicas < 1 or gpus < 1:
        raise ValueError(f"replicas ({replicas}) and gpus ({gpus}) must be >= 1")
    per_gpu = -(-replicas // gpus)
    # NOTE: rounded down to Ray's 1e-4 resource grain, so per_gpu shares never exceed 1.
    share = 1.0 if per_gpu == 1 else int(10_000 / per_gpu) / 10_000
    return {"gpus": gpus, "replicas": replicas, "replicas_per_gpu": per_gpu,
            "num_gpus_per_replica": share, "gpus_used": min(gpus, replicas)}


def kv_fit(num_blocks: int, replicas_per_gpu: int, gpu_bytes: int, arch: dict[str, int],
           block_size: int = 16, dtype_bytes: int = 2, overhead_bytes: int = 4 << 30,
           headroom: float = 0.92) -> dict[str, Any]:
    """Whether ``replicas_per_gpu`` replicas of the checkpoint ``arch`` (config.json fields),
    each with a ``num_blocks`` KV pool, fit one GPU of ``gpu_bytes``: per replica, weights +
    KV + ``overhead_bytes`` (CUDA context of the replica and its engine process, activations of
    an 8,192-token step, CUDA-graph pool, allocator slack), all of it under ``headroom`` of the
    GPU. ``max_blocks``: the largest pool per replica that fits."""
    layers, hidden = arch["num_hidden_layers"], arch["hidden_size"]
    heads = arch["num_attention_heads"]
    kv_heads = arch.get("num_key_value_heads") or heads
    head_dim = arch.get("head_dim") or hidden // heads
    inter, vocab = arch["intermediate_size"], arch.get("vocab_size", 49_152)
    per_block = 2 * layers * kv_heads * head_dim * block_size * dtype_bytes
    per_layer = hidden * (heads * head_dim) * 2 + hidden * kv_heads * head_dim * 2 \
        + 3 * hidden * inter
    embed = vocab * hidden * (1 if arch.get("tie_word_embeddings", True) else 2)
    weights = (layers * per_layer + embed) * dtype_bytes
    per_replica = weights + num_blocks * per_block + overhead_bytes
    room = int(gpu_bytes * headroom) // replicas_per_gpu - weights - overhead_bytes
    return {"kv_bytes_per_block": per_block, "weights_bytes": weights,
            "kv_bytes_per_replica": num_blocks * per_block, "overhead_bytes": overhead_bytes,
            "bytes_per_gpu": per_replica * replicas_per_gpu, "gpu_bytes": gpu_bytes,
            "fits": per_replica * replicas_per_gpu <= gpu_bytes * headroom,
            "max_blocks": max(room // per_block, 0)}


def replay_plan(routers: dict[str, list[str]], workloads: list[str],
                seeds: list[int]) -> list[tuple[str, list[tuple[int, str, str]]]]:
    """Per deployment (router), its replays as (seed, workload, policy), seed-major: a budget
    that runs out cuts the later seeds of every deployment, not whole policies."""
    return [(r, [(s, w, p) for s in seeds for w in workloads for p in ps])
            for r, ps in routers.items()]


class Budget:
    """Stops starting replays that would overrun ``budget_s`` (0 = no budget), measured from
    ``start`` on ``clock``. The time left after each deployment is split between it and the
    deployments still to come in proportion to their replays (each later one also keeps a
    deployment's worth, as long as this one's took), so a short budget trims every policy's
    later seeds alike. A replay's cost is estimated as the longest replay of its workload seen
    so far (unknown: assumed to fit)."""

    def __init__(self, budget_s: float, clock: Any = time.monotonic) -> None:
        self.budget_s = budget_s
        self.clock = clock
        self.start = clock()
        self.deadline = float("inf")
        self.walls: dict[str, float] = {}

    def elapsed(self) -> float:
        return self.clock() - self.start

    def open_deployment(self, replays: int, later_replays: int, later_deployments: int,
                        deploy_s: float) -> None:
        if not self.budget_s:
            return
        left = self.budget_s - self.elapsed() - later_deployments * deploy_s
        share = replays / max(replays + later_replays, 1)
        self.deadline = self.clock() + max(left, 0.0) * share

    def allows(self, workload: str) -> bool:
        if not self.budget_s:
            return True
        end = self.clock() + self.walls.get(workload, 0.0)
        return end <= self.deadline and end - self.start <= self.budget_s

    def record(self, workload: str, wall_s: float) -> None:
        self.walls[workload] = max(self.walls.get(workload, 0.0), wall_s)
