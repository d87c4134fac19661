"""Workload generators (deterministic by seed) and their registry.

``build_workload(name, seed, scale, arrival=None)`` returns a ``Workload``; ``WORKLOADS`` maps
names to builders; ``workload_stats`` summarises a workload's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.workloads.agents import long_doc_qa, tool_agent, toolbench
from benchmarks.workloads.conversational import b2b_saas, multi_turn_chat
from benchmarks.workloads.shared_prefix import (
    generated_shared_prefix,
    prefix_repetition,
    sibling_bursts,
)
from benchmarks.workloads.stats import WorkloadStats, workload_stats
from benchmarks.workloads.trace import TRACE_PREFIX, load_trace
from benchmarks.workloads.types import BlockIds, SimRequest, Workload

WORKLOADS: dict[str, Callable[..., Workload]] = {
    "generated_shared_prefix": generated_shared_prefix,
    "prefix_repetition": prefix_repetition,
    "multi_turn_chat": multi_turn_chat,
    "tool_agent": tool_agent,
    "b2b_saas": b2b_saas,
    "toolbench": toolbench,
    "long_doc_qa": long_doc_qa,
    "sibling_bursts": sibling_bursts,
}


def build_workload(
    name: str, seed: int = 0, scale: float = 1.0, arrival: str | None = None, **overrides: Any
) -> Workload:
    """Build a registered workload; ``arrival`` (poisson/gamma) replaces its default process.
    ``trace:<path>`` replays a JSONL trace (``workloads/trace.py``; seed, scale and overrides
    do not apply to it)."""
    if name.startswith(TRACE_PREFIX):
        return load_trace(name[len(TRACE_PREFIX):])
    builder = WORKLOADS.get(name)
    if builder is None:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    if arrival is not None:
        overrides["arrival"] = arrival
    return builder(seed, scale, **overrides)


__all__ = [
    "TRACE_PREFIX",
    "WORKLOADS",
    "BlockIds",
    "SimRequest",
    "Workload",
    "WorkloadStats",
    "build_workload",
    "load_trace",
    "workload_stats",
]
