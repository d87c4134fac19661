"""Router-side block hashes of workload prompts, memoised on (parent hash, content id).

The router hashes every prompt before Select. With block-granular synthetic tokens a block's
hash is a function of its parent's hash and its content id, so shared prefixes (system prompts,
documents) are hashed once per workload instead of once per request. The values are exactly
``hasher.external_hashes(tokens, block_size)`` of the pool's own hasher (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmanager.hashing import BlockHasher, NativeHash


class BlockHashMemo:
    """Chained external hashes of block-granular prompts."""

    def __init__(self, hasher: BlockHasher, block_size: int, max_entries: int = 1_000_000) -> None:
        self.hasher = hasher
        self.block_size = block_size
        self.max_entries = max_entries
        self._memo: dict[tuple[NativeHash | None, int], NativeHash] = {}

    def hashes(self, prompt_blocks: Sequence[int]) -> list[int]:
        """External hashes of every block of the prompt (all blocks are full)."""
        out: list[int] = []
        parent: NativeHash | None = None
        memo, bs = self._memo, self.block_size
        for content in prompt_blocks:
            key = (parent, content)
            h = memo.get(key)
            if h is None:
                if len(memo) >= self.max_entries:
                    memo.clear()  # NOTE: bounded memory on 1M-request runs; values are pure.
                h = self.hasher.hash_block(parent, [content] * bs)
                memo[key] = h
            out.append(self.hasher.external(h))
            parent = h
        return out

    def __len__(self) -> int:
        return len(self._memo)
