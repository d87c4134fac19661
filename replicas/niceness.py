"""The serving path's CPU priority over other Ray work on its nodes (app setting ``niceness``).

Ray starts every worker process at niceness 15 (its ``worker_niceness``, env
``RAY_worker_niceness`` of ``ray start``), so that the raylet and GCS stay responsive when tasks
saturate a node. The app's replicas are workers too: on a node that also runs other Ray work
(batch tasks, training, another app), the serving path gets no more CPU than any of it. With
``niceness`` set, each replica process (ingress, LLM replica and the engine core's process it
spawns, selection service) moves every one of its threads to that niceness at start; threads and
processes started afterwards inherit it (the engine core's process is spawned after).

Measured on the 2-core box (``serve_overhead_notes.md``, session 19): beside two CPU-bound
processes at 15, ``niceness: 0`` gave the served app 1.4-1.9x the output tok/s at c=1 and
1.1-1.6x at c=16; on a node serving alone it cost a little (c=1 TTFT +2-3 ms, c=16 up to -17%),
because Serve's HAProxy, a child of a Serve actor, stays at 15. So it is off by default.

Raising a niceness is always allowed; lowering it needs root or CAP_SYS_NICE, else the replica
logs a warning and keeps Ray's.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

from pydantic import Field

from replicas.env_value import env_value

logger = logging.getLogger("ray.serve")  # NOTE: Serve keeps it in the replica's log

ENV = "TINYSERVE_NICENESS"
TASKS = "/proc/self/task"
MIN, MAX = -20, 19
Niceness = Annotated[int, Field(ge=MIN, le=MAX)]  # NOTE: what the app's settings accept


def target_from_env() -> int | None:
    """The niceness ``ENV`` names, or None when it is unset or empty (leave the process be)."""
    value = env_value(ENV, int, "an integer niceness")
    if value is None:
        return None
    if not MIN <= value <= MAX:
        raise ValueError(f"{ENV} must be in [{MIN}, {MAX}], got {value}")
    return value


def niceness_of(pid: int | None) -> int | None:
    """A process's niceness (its main thread's), None without one or once it is gone."""
    if pid is None:
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return None


def _thread_ids() -> list[int]:
    """This process's thread ids (Linux: each thread has its own niceness), else [0]: the
    calling thread, which is all ``setpriority`` reaches elsewhere."""
    try:
        return [int(t) for t in os.listdir(TASKS)]
    except OSError:
        return [0]


def apply_niceness(target: int | None = None) -> str:
    """Set every thread of this process to niceness ``target`` (``ENV`` when None; neither =
    nothing changes). Returns what happened, for the replica's log: "unchanged", "15 -> 0", or
    "15 -> 0 not permitted: ...". Never raises for a missing permission or a thread that exited."""
    target = target_from_env() if target is None else target
    if target is None:
        return "unchanged"
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if before == target:
        return "unchanged"
    denied = 0
    for tid in _thread_ids():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:
            continue  # NOTE: the thread ended since the listing
        except PermissionError:
            denied += 1
    if denied:
        msg = (f"{before} -> {target} not permitted for {denied} thread(s): lowering a niceness "
               f"needs root or CAP_SYS_NICE (or start Ray with RAY_worker_niceness={target}: "
               "every worker of the node)")
        logger.warning("process niceness %s", msg)
        return msg
    logger.info("process niceness %d -> %d", before, target)
    return f"{before} -> {target}"
