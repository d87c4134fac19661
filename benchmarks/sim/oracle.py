"""A benchmark-only ORACLE: the selection core is told the simulator's true state.

Not a product feature and never a default. ``SimConfig(oracle=...)`` names what the core
learns exactly instead of through the replicas' reports, as '+'-joined parts (or ``all``):

    speed   each load report's prefill/decode rates are the replica's measured nominal rates
            times the speed factor in force NOW (benchmarks/sim/scenarios.py): a slowed
            replica is seen exactly as slow, from the instant it slows until it recovers
    cache   KV events reach the index at once (no event lag) and none is lost (the
            lossy_events scenario's drops are off), so the index holds what the pools hold
    load    every replica whose state changed is re-reported just before each Select, so the
            queue the objective sees is the queue there is (no snapshot period)

What it bounds: R(c) can only shift a replica's score by what its realised outcomes reveal
about the replica's speed and cache (cluster/selector/reward.py). TinyServe with the truth
in place of the reports (and R off) is the most any reward of that kind can add to the
objective; where even it misses a target, no tuning of R reaches it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from benchmarks.sim.scenarios import speed_at
from cluster.selector.types import LoadSnapshot

ORACLE_PARTS = ("speed", "cache", "load")


def parse_oracle(spec: str) -> frozenset[str]:
    """'' -> none; 'all' -> every part; else '+'-joined names of ``ORACLE_PARTS``
    (ValueError naming the unknown part)."""
    if not spec:
        return frozenset()
    if spec == "all":
        return frozenset(ORACLE_PARTS)
    parts = frozenset(p.strip() for p in spec.split("+"))
    unknown = sorted(parts - set(ORACLE_PARTS))
    if unknown:
        raise ValueError(f"unknown oracle part(s) {unknown}; known: {list(ORACLE_PARTS)} or 'all'")
    return parts


@dataclass(frozen=True, slots=True)
class Oracle:
    """Which true state the core is given (module docstring); empty = the reports only."""

    parts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, spec: str) -> Oracle:
        return cls(parse_oracle(spec))

    @property
    def speed(self) -> bool:
        return "speed" in self.parts

    @property
    def cache(self) -> bool:
        return "cache" in self.parts

    @property
    def load(self) -> bool:
        return "load" in self.parts

    def event_lag(self, configured_s: float) -> float:
        """The KV-event lag in force: 0 with ``cache``."""
        return 0.0 if self.cache else configured_s

    def drop_probability(self, configured: float) -> float:
        """Per-block event loss in force: 0 with ``cache``."""
        return 0.0 if self.cache else configured

    def report(self, snap: LoadSnapshot, windows: list[tuple[float, float, float]],
               now: float) -> LoadSnapshot:
        """``snap`` with its rates scaled by the true speed at ``now`` (``speed``); else as is.
        NOTE: the meter's nominal rates are the healthy replica's; times the speed factor they
        are what the slowed replica really computes."""
        if not self.speed or not windows:
            return snap
        speed = speed_at(windows, now)
        if speed == 1.0:
            return snap
        return dataclasses.replace(snap, prefill_tokens_per_s=snap.prefill_tokens_per_s * speed,
                                   decode_tokens_per_s=snap.decode_tokens_per_s * speed)
