"""Fault scenarios: replicas that are slower than they report, or whose KV events get lost.

A scenario is a name resolved against a workload and a cluster size into ``Faults``:

    hetero        a quarter of the replicas (every 4th, r003, r007, ...) at half speed for the
                  whole run: an older GPU generation in a mixed fleet
    slowdown      replica r000 slows to a third of its speed from 25% to 60% of the workload's
                  arrival span, then recovers: a noisy neighbour
    lossy_events  10% of replica r000's KV events are lost on the way to the selection service
                  (each event independently, seeded): a lossy event stream. Lost BlockRemoved
                  events leave blocks in the index that the pool evicted (predicted hits that
                  miss); lost BlockStored events hide blocks it holds.

"Slower than it reports": by default (``Faults.reported`` False) a slowed replica's rate meter
keeps seeing its nominal step times, so its LoadSnapshot rates stay those of a healthy replica,
as for an engine whose reports lag or lie, or a vLLM engine seen only through its KV events
(no rate report at all). ``reported=True`` lets the meter see the real step times (the
replica measures its own slowdown, replicas/rate_meter.py).
"""

from __future__ import annotations

from dataclasses import dataclass

SCENARIOS = ("hetero", "slowdown", "lossy_events")


@dataclass(frozen=True, slots=True)
class SpeedWindow:
    """Replica ``index`` runs at ``speed`` x its calibrated speed in [start_s, end_s)."""

    index: int
    start_s: float
    end_s: float
    speed: float


@dataclass(frozen=True, slots=True)
class Faults:
    """What goes wrong in one run (nothing, by default)."""

    slow: tuple[SpeedWindow, ...] = ()
    drop_events: tuple[tuple[int, float], ...] = ()  # (replica index, probability per event)
    reported: bool = False

    def speed_windows(self, index: int) -> list[tuple[float, float, float]]:
        return [(w.start_s, w.end_s, w.speed) for w in self.slow if w.index == index]

    def drop_probability(self, index: int) -> float:
        return max((p for i, p in self.drop_events if i == index), default=0.0)


def resolve(name: str, num_replicas: int, span_s: float, reported: bool = False) -> Faults:
    """The ``Faults`` of scenario ``name`` ('' = none) for ``num_replicas`` replicas and a
    workload whose arrivals span ``span_s`` seconds; ValueError for an unknown name."""
    if not name:
        return Faults()
    forever = float("inf")
    if name == "hetero":
        slow = tuple(SpeedWindow(i, 0.0, forever, 0.5) for i in range(3, num_replicas, 4))
        return Faults(slow=slow, reported=reported)
    if name == "slowdown":
        return Faults(slow=(SpeedWindow(0, 0.25 * span_s, 0.6 * span_s, 1.0 / 3.0),),
                      reported=reported)  # fmt: skip
    if name == "lossy_events":
        return Faults(drop_events=((0, 0.1),), reported=reported)
    raise ValueError(f"unknown scenario {name!r}; known: {list(SCENARIOS)}")


def speed_at(windows: list[tuple[float, float, float]], t: float) -> float:
    """The speed factor in force at time ``t`` (1.0 outside every window)."""
    for start, end, speed in windows:
        if start <= t < end:
            return speed
    return 1.0
