"""What the pool keeps per request, and the prefix-hit result it hands the engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmanager.hashing import NativeHash

if TYPE_CHECKING:
    from kvmanager.manager import KVCacheManager


@dataclass(slots=True)
class PrefixHit:
    """Longest cached prefix of a token sequence. ``block_hashes`` are the external (64-bit)
    hashes; ``parent_native`` is the hasher's native hash of the last hit block (opaque; lets
    the pool continue the chain without rehashing)."""

    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    parent_native: NativeHash | None = None


@dataclass(slots=True)
class RequestState:
    """One request's block table and hashing progress (owned by ``KVCacheManager``)."""

    block_ids: list[int]
    num_computed_tokens: int
    num_hashed_blocks: int
    last_native: NativeHash | None
    extra_keys: tuple[Any, ...] | None
    expected_num_tokens: int | None
    num_prefix_blocks: int = 0  # blocks that came from a prefix hit (the table's first run)

    def splits(self, num_held: int, new_ids: list[int]) -> bool:
        """True when ``new_ids``, appended to the first ``num_held`` blocks, start a new run of
        the request's own blocks: scattered, or not right after its last own block. (The gap
        between a prefix hit and the first own block is expected: "<= 2 runs".)"""
        if not new_ids:
            return False
        if new_ids[-1] - new_ids[0] != len(new_ids) - 1:
            return True
        return num_held > self.num_prefix_blocks and new_ids[0] != self.block_ids[num_held - 1] + 1


def register(
    mgr: KVCacheManager,
    request_id: str,
    token_ids: Sequence[int],
    hit: PrefixHit,
    extra_keys: tuple[Any, ...] | None,
    expected_num_tokens: int | None,
) -> RequestState:
    """Admit ``request_id`` into ``mgr`` (its first ``allocate_slots``): take a reference on
    every (validated) hit block, count the prefix hit, and return the new RequestState."""
    for depth, b in enumerate(hit.block_ids):
        if mgr._ref_cnt[b] == 0:
            mgr._evictable.remove(b)
        mgr._ref_cnt[b] += 1
        mgr._evictable.touch(b, mgr._clock, depth)
    mgr._epochs.record(hit.block_ids)
    mgr._prefix_query_tokens += len(token_ids)
    mgr._prefix_hit_tokens += hit.num_cached_tokens
    mgr._levels.tokens["device"] += hit.num_cached_tokens
    mgr._levels.tokens["recompute"] += len(token_ids) - hit.num_cached_tokens
    req = RequestState(
        list(hit.block_ids), hit.num_cached_tokens, len(hit.block_ids), hit.parent_native,
        extra_keys, expected_num_tokens, len(hit.block_ids),
    )  # fmt: skip
    mgr._requests[request_id] = req
    return req
