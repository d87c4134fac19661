"""Configuration of one TinyServe block pool (frozen: read on hot paths)."""

from __future__ import annotations

from dataclasses import dataclass

ALLOCATORS = ("best_fit", "first_free")
EVICTIONS = ("adaptive", "lru")
HASH_MODES = ("fast", "vllm")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Pool shape and policies.

    Fragmentation weights follow ARCHITECTURE.md: F_total = frag_alpha*F_spatial +
    frag_beta*F_temporal + frag_gamma*F_access. ``frag_sigma`` is the spatial decay σ (distances
    are normalised by ``num_blocks``); ``epoch_ops`` is how many pool operations make one
    access epoch for F_temporal; ``num_epochs`` how many epochs it looks back.
    ``adaptive_half_life`` (in pool operations) sets how fast the adaptive eviction score forgets:
    small -> LRU-like, large -> LFU-like.
    """

    num_blocks: int
    block_size: int = 16
    allocator: str = "best_fit"
    eviction: str = "adaptive"
    hash_mode: str = "fast"
    enable_prefix_caching: bool = True
    hash_seed: str | None = None
    adaptive_half_life: float = 512.0
    frag_alpha: float = 0.5
    frag_beta: float = 0.3
    frag_gamma: float = 0.2
    frag_sigma: float = 0.5
    epoch_ops: int = 256
    num_epochs: int = 4

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if self.hash_mode not in HASH_MODES:
            raise ValueError(f"hash_mode must be one of {HASH_MODES}, got {self.hash_mode!r}")
        if self.adaptive_half_life <= 0:
            raise ValueError("adaptive_half_life must be positive")
        if self.frag_sigma <= 0:
            raise ValueError("frag_sigma must be positive")
        if self.epoch_ops <= 0 or self.num_epochs <= 0:
            raise ValueError("epoch_ops and num_epochs must be positive")
