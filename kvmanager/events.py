"""KV-cache events with vLLM's semantics and field names (``vllm.distributed.kv_events``).

A pool appends events as blocks become cached (``BlockStored``), are evicted
(``BlockRemoved``) or the whole cache is reset (``AllBlocksCleared``); the replica drains them
with ``take_events()`` and streams them to the selection service. Block hashes are the 64-bit
external form (``kvmanager.hashing``), exactly what vLLM publishes by default.
"""

from __future__ import annotations

from dataclasses import dataclass

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"


@dataclass(slots=True, frozen=True)
class BlockStored:
    """Consecutive full blocks of one chain became cached. ``token_ids`` holds all their tokens
    in order (``len == len(block_hashes) * block_size``); ``parent_block_hash`` is the hash of
    the block before the first one (None at the start of a sequence)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU


@dataclass(slots=True, frozen=True)
class BlockRemoved:
    """Blocks were evicted (or moved away from ``medium``)."""

    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


@dataclass(slots=True, frozen=True)
class AllBlocksCleared:
    """Every cached block of the pool was dropped (reset)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
