"""Workload data model: block-granular synthetic requests.

A prompt is a tuple of *content ids*, one per KV block of ``block_size`` tokens; the token ids of
a block are its content id repeated ``block_size`` times::

    prompt_blocks = (7, 7, 9)  ->  tokens = [7]*16 + [7]*16 + [9]*16      (block_size 16)

NOTE: chained hashing makes a block's hash depend on every block before it, so reusing a content
id at a different position (or after a different parent) never fakes a prefix hit. Shared
segments (system prompts, documents, tool instructions) reuse the same ids; everything unique to
a request draws fresh ids from ``BlockIds``. This keeps prompts exact for the real pool's
hashing while a 1M-request workload stays a few tuples of ints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_BLOCK_SIZE = 16


class BlockIds:
    """Sequential content-id allocator (deterministic: ids depend only on call order)."""

    def __init__(self, start: int = 1) -> None:
        self._next = start

    def take(self, num_blocks: int) -> tuple[int, ...]:
        """``num_blocks`` fresh ids never returned before by this allocator."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        ids = tuple(range(self._next, self._next + num_blocks))
        self._next += num_blocks
        return ids


def blocks_for(num_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Blocks needed for ``num_tokens`` tokens (at least one)."""
    return max(1, -(-num_tokens // block_size))


@dataclass(slots=True, frozen=True)
class SimRequest:
    """One request of a workload.

    ``arrival_s`` is the open-loop arrival time. A request with ``parent_id`` is closed-loop: it
    arrives ``think_time_s`` after its parent completes (or at ``arrival_s``, whichever is
    later), like the next turn of a chat. ``output_blocks`` are the content ids of the generated
    tokens (so a later turn that quotes this answer shares its KV blocks).
    """

    request_id: str
    arrival_s: float
    prompt_blocks: tuple[int, ...]
    num_output_tokens: int
    output_blocks: tuple[int, ...]
    session_id: str = ""
    parent_id: str | None = None
    think_time_s: float = 0.0

    def num_prompt_tokens(self, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
        return len(self.prompt_blocks) * block_size

    def token_ids(self, block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
        """Prompt followed by output tokens, int64 (the engine's full token sequence)."""
        blocks = np.asarray(self.prompt_blocks + self.output_blocks, dtype=np.int64)
        return np.repeat(blocks, block_size)


@dataclass(slots=True)
class Workload:
    """A named, seeded list of requests sorted by ``arrival_s``.

    ``params`` records every generator parameter (with ``source`` saying where the shape comes
    from); ``stages`` lists ``(start_s, end_s, qps)`` windows for QPS-swept workloads;
    ``kv_blocks_per_replica`` is set when the workload fixes the cluster's KV capacity (e.g.
    B2B SaaS at 73% demand) and is None when the calibrated pool size applies.
    """

    name: str
    seed: int
    requests: list[SimRequest]
    params: dict[str, Any] = field(default_factory=dict)
    stages: list[tuple[float, float, float]] = field(default_factory=list)
    kv_blocks_per_replica: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE

    def __len__(self) -> int:
        return len(self.requests)

    def sort(self) -> Workload:
        """Sort requests by arrival (stable: ties keep generation order); returns self."""
        self.requests.sort(key=lambda r: r.arrival_s)
        return self
