"""Baseline routing policies, re-implemented from their published rules (same interface as
the TinyServe objective, see ``cluster.selector.policy``). Each docstring says what it follows.

Prefix-aware baselines read ``num_matched_blocks + num_pending_blocks``: the service's
speculative pending inserts play the role of SGLang's router-side radix-tree inserts.
"""

from __future__ import annotations

import numpy as np

from cluster.selector.policy import Policy, prefix_fraction, rank_by, register_policy
from cluster.selector.types import Candidates, FloatArray, Ranking, SelectionRequest

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@register_policy
class RoundRobin(Policy):
    """Rotate through candidates in order, ignoring cache and load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        n = len(candidates)
        start = self._next % max(n, 1)
        self._next += 1
        order = np.roll(np.arange(n, dtype=np.int64), -start)
        scores = np.empty(n, np.float64)
        scores[order] = np.arange(n, 0, -1, dtype=np.float64)
        return Ranking(self.name, order, scores)


def _load(candidates: Candidates) -> FloatArray:
    return np.asarray(candidates.num_queued_tokens, dtype=np.float64)


@register_policy
class PowerOfTwo(Policy):
    """Power of two choices: sample two candidates, take the less loaded (queued tokens)."""

    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        n = len(candidates)
        load = _load(candidates)
        scores = -load
        if n >= 2:
            a, b = self._rng.choice(n, size=2, replace=False)
            # NOTE: the two sampled rows outrank every unsampled one, the less loaded first.
            scores = scores - (np.max(load) + 1.0)
            scores[a] = -load[a]
            scores[b] = -load[b]
        return rank_by(self.name, scores, {"load_cost": load})


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


@register_policy
class SessionHash(Policy):
    """Session-consistent hashing (rendezvous / highest-random-weight): a session keeps its
    replica while that replica is a candidate, and only 1/R of sessions move when one leaves.
    Key: session_id, else the first block hash, else request_id."""

    name = "session_hash"

    def __init__(self) -> None:
        self._salt: dict[str, int] = {}

    def _salt_of(self, replica_id: str) -> int:
        salt = self._salt.get(replica_id)
        if salt is None:
            import hashlib

            salt = int.from_bytes(
                hashlib.blake2b(replica_id.encode(), digest_size=8).digest(), "little"
            )
            self._salt[replica_id] = salt
        return salt

    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        import hashlib

        if request.session_id:
            key_src = request.session_id.encode()
        elif len(request.block_hashes):
            key_src = int(request.block_hashes[0]).to_bytes(8, "little")
        else:
            key_src = request.request_id.encode()
        key = int.from_bytes(hashlib.blake2b(key_src, digest_size=8).digest(), "little")
        salts = np.fromiter(
            (self._salt_of(r) for r in candidates.replica_ids), np.uint64, len(candidates)
        )
        weights = _splitmix64(salts ^ np.uint64(key))
        scores = (weights >> np.uint64(11)).astype(np.float64)  # 53 bits: exact in float64
        return rank_by(self.name, scores)


@register_policy
class SGLangCacheAware(Policy):
    """SGLang router's cache-aware rule. If load is imbalanced (max - min > ``balance_abs`` AND
    max > ``balance_rel`` x min, load = running + waiting requests) pick the least loaded.
    Otherwise, if the best prefix match rate exceeds ``cache_threshold`` pick the best match,
    else the replica with the smallest cache (fewest cached blocks, SGLang's smallest tree)."""

    name = "sglang_cache_aware"

    def __init__(
        self, cache_threshold: float = 0.3, balance_abs: int = 64, balance_rel: float = 1.5
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel

    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        load = (candidates.num_running_reqs + candidates.num_waiting_reqs).astype(np.float64)
        match = prefix_fraction(request, candidates)
        terms = {"similarity": match, "load_cost": load}
        if len(candidates) == 0:
            return rank_by(self.name, load, terms)
        lo, hi = float(load.min()), float(load.max())
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            return rank_by(self.name, -load, terms)
        if float(match.max()) > self.cache_threshold:
            # NOTE: among equal matches, the less loaded first (1e-9 keeps match dominant).
            return rank_by(self.name, match - 1e-9 * load, terms)
        tree = candidates.num_cached_blocks.astype(np.float64)
        return rank_by(self.name, -tree - 1e-9 * load, terms)


@register_policy
class DynamoCost(Policy):
    """NVIDIA Dynamo KV router cost: ``overlap_weight x prefill_blocks + decode_blocks`` where
    prefill_blocks are the prompt blocks NOT cached on the worker and decode_blocks its active
    blocks (queued tokens / block_size); lowest cost wins (temperature 0)."""

    name = "dynamo_cost"

    def __init__(self, overlap_weight: float = 1.0) -> None:
        self.overlap_weight = overlap_weight

    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        overlap = candidates.num_matched_blocks + candidates.num_pending_blocks
        prefill = np.maximum(request.num_prompt_blocks - overlap, 0).astype(np.float64)
        decode = candidates.num_queued_tokens / np.maximum(candidates.block_size, 1)
        cost = self.overlap_weight * prefill + decode
        return rank_by(self.name, -cost, {"cost": cost, "size_cost": prefill, "load_cost": decode})


@register_policy
class LlmdWeighted(Policy):
    """llm-d inference scheduler: weighted sum of scorers in [0, 1], max wins. prefix-cache
    scorer (matched fraction) x3, queue scorer ((max - q) / (max - min) over waiting requests,
    1 when all equal) x2, kv-cache-utilization scorer (1 - usage) x2."""

    name = "llmd_weighted"

    def __init__(
        self, prefix_weight: float = 3.0, queue_weight: float = 2.0, kv_util_weight: float = 2.0
    ) -> None:
        self.weights = (prefix_weight, queue_weight, kv_util_weight)

    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        prefix = prefix_fraction(request, candidates)
        q = candidates.num_waiting_reqs.astype(np.float64)
        span = float(q.max() - q.min()) if len(q) else 0.0
        queue = (q.max() - q) / span if span > 0 else np.ones_like(q)
        kv = 1.0 - np.clip(candidates.usage, 0.0, 1.0)
        wp, wq, wk = self.weights
        scores = wp * prefix + wq * queue + wk * kv
        return rank_by(
            self.name,
            scores,
            {"similarity": prefix, "load_cost": 1.0 - queue, "size_cost": 1.0 - kv},
        )


@register_policy
class PrebleExploreExploit(Policy):
    """Preble's E2 scheduling: exploit (longest prefix match, least loaded among ties) when the
    best match covers more tokens than it leaves uncached (match > ``exploit_ratio``); else
    explore: the lowest load cost = queued tokens + this request's uncached prefill tokens +
    eviction pressure (blocks it needs beyond the free ones, in tokens). Preble's periodic
    rebalancing and hot-prefix replication are not modelled."""

    name = "preble"

    def __init__(self, exploit_ratio: float = 0.5) -> None:
        self.exploit_ratio = exploit_ratio

    def select(self, request: SelectionRequest, candidates: Candidates) -> Ranking:
        match = prefix_fraction(request, candidates)
        bs = np.maximum(candidates.block_size, 1)
        matched_tokens = (candidates.num_matched_blocks + candidates.num_pending_blocks) * bs
        uncached = np.maximum(request.num_prompt_tokens - matched_tokens, 0)
        need_blocks = uncached // bs + request.num_output_tokens // bs + 1
        evict = np.maximum(need_blocks - candidates.num_free_blocks, 0) * bs
        cost = (candidates.num_queued_tokens + uncached + evict).astype(np.float64)
        terms = {"similarity": match, "cost": cost}
        if len(candidates) and float(match.max()) > self.exploit_ratio:
            scale = float(cost.max()) + 1.0
            return rank_by(self.name, match - 1e-6 * cost / scale, terms)
        return rank_by(self.name, -cost, terms)
