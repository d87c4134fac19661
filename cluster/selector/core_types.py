"""Result dataclasses of ``SelectorCore`` (what the servicer turns into protos)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.selector.objective import ObjectiveConfig
from cluster.selector.types import LoadSnapshot, Ranked


@dataclass(slots=True)
class Selection:
    """Answer to one Select: the policy that ranked, best first (possibly truncated to
    max_results), and how many named candidates were unknown (ignored)."""

    policy: str
    ranked: list[Ranked]
    num_prompt_blocks: int
    num_unknown_replicas: int = 0

    @property
    def replica_id(self) -> str | None:
        """The winner, or None when there was no known candidate."""
        return self.ranked[0].replica_id if self.ranked else None


@dataclass(slots=True, frozen=True)
class ApplyResult:
    """Outcome of one event batch / resync. ``applied`` False with ``resync_required`` True:
    sequence gap, nothing applied. ``last_seq`` is the last applied seq (-1: none)."""

    applied: bool
    resync_required: bool
    last_seq: int
    num_events: int


@dataclass(slots=True)
class ReplicaStatus:
    replica_id: str
    node_id: str
    block_size: int
    num_resident_blocks: int
    num_pending_blocks: int
    synced: bool
    connected: bool
    last_seen_age_s: float
    last_seq: int
    load: LoadSnapshot = field(default_factory=LoadSnapshot)


@dataclass(slots=True)
class CoreStats:
    num_replicas: int
    num_unique_blocks: int
    counters: dict[str, int]
    decisions: dict[str, int]
    uptime_s: float
    default_policy: str
    tinyserve_w: tuple[float, ...]


@dataclass(slots=True, frozen=True)
class CoreConfig:
    """Service configuration; limits bound what one message may carry."""

    default_policy: str = "tinyserve"
    pending_ttl_s: float = 2.0
    # NOTE: (block_hash, replica) pending marks the tables hold before their first doubling:
    # pending_ttl_s x Selects/s x uncached blocks per Select (2 s x 1,000/s x 64 here). A
    # doubling costs milliseconds, once, on the Select that crosses it; sized ahead, Selects
    # at that rate never pay one (deletion leaves no tombstones, so no rebuilds either).
    pending_reserve_marks: int = 131072
    stale_after_s: float = 30.0
    hot_half_life_s: float = 60.0
    max_prompt_blocks: int = 16384
    max_events_per_batch: int = 65536
    max_hashes_per_event: int = 65536
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    seed: int = 0  # NOTE: passed to every policy that takes one (power-of-two's sampling)
