"""Router-side block hashes of workload prompts, memoised on (parent hash, content id).

The router hashes every prompt before Select. With block-granular synthetic tokens a block's
hash is a function of its parent's hash and its content id, so shared prefixes (system prompts,
documents) are hashed once per workload instead of once per request. The values are exactly
``hasher.external_hashes(tokens, block_size)`` of the pool's own hasher (a test checks it).
``MemoHasher`` does the same for the pools' own hashing (admission lookups and commits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvmanager.hashing import BlockHasher, NativeHash


class BlockHashMemo:
    """Chained external hashes of block-granular prompts."""

    def __init__(self, hasher: BlockHasher, block_size: int, max_entries: int = 1_000_000) -> None:
        self.hasher = hasher
        self.block_size = block_size
        self.max_entries = max_entries
        self._memo: dict[tuple[NativeHash | None, int], tuple[NativeHash, int]] = {}

    def hashes(self, prompt_blocks: Sequence[int]) -> list[int]:
        """External hashes of every block of the prompt (all blocks are full)."""
        out: list[int] = []
        parent: NativeHash | None = None
        memo, bs = self._memo, self.block_size
        for content in prompt_blocks:
            key = (parent, content)
            hit = memo.get(key)
            if hit is None:
                if len(memo) >= self.max_entries:
                    memo.clear()  # NOTE: bounded memory on 1M-request runs; values are pure.
                h = self.hasher.hash_block(parent, [content] * bs)
                hit = memo[key] = (h, self.hasher.external(h))
            out.append(hit[1])
            parent = hit[0]
        return out

    def __len__(self) -> int:
        return len(self._memo)


class MemoHasher(BlockHasher):
    """A pool-side ``BlockHasher`` that memoises another hasher's ``hash_block``.

    The simulated pools hash the same shared blocks (system prompts, documents) on every
    admission (``lookup_prefix``) and every commit; one memo shared by every replica's pool
    computes each (parent, block tokens, extra keys) once. Values are exactly the wrapped
    hasher's (the key is the full input, not a digest of it); the memo is cleared when full.
    """

    def __init__(self, inner: BlockHasher, max_entries: int = 1_000_000) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_entries = max_entries
        self._memo: dict[tuple[NativeHash | None, tuple[int, ...], Any], NativeHash] = {}
        # NOTE: the wrapped hasher's own bound method (an instance attribute shadows the class
        # one): external() is called per block, a forwarding layer cost as much as it does.
        self.external = inner.external  # type: ignore[method-assign]

    def hash_block(
        self,
        parent: NativeHash | None,
        token_ids: Sequence[int],
        extra_keys: tuple[Any, ...] | None = None,
    ) -> NativeHash:
        key = (parent, tuple(token_ids), extra_keys)
        try:
            h = self._memo.get(key)
        except TypeError:  # unhashable extra keys: no memo
            return self.inner.hash_block(parent, token_ids, extra_keys)
        if h is None:
            memo = self._memo
            if len(memo) >= self.max_entries:
                memo.clear()  # NOTE: bounded memory on long runs; values are pure.
            h = memo[key] = self.inner.hash_block(parent, token_ids, extra_keys)
        return h

    def external(self, h: NativeHash) -> int:
        return self.inner.external(h)

    def __len__(self) -> int:
        return len(self._memo)
