"""How late an asyncio loop runs its timers: the serving path's "is this loop busy?" probe.

A task sleeps ``period_s`` again and again and records, per wake-up, by how much it overshot
(``lag``): a long callback, a burst of ready callbacks or the GIL held by another thread all
show up as lag. The per-hop breakdown (``cluster.serve.openai_trace``) asks for the largest
lag in a wall-clock window, e.g. the 100 ms before a request's handler was entered: a large
value there says the hop waited on this loop, a small one that it waited before it (HTTP,
the load balancer, Serve's own dispatch).

Off unless ``TINYSERVE_LOOP_LAG`` is set to a period in milliseconds (``serve_overhead.py
--loop-lag``): 500 wake-ups a second cost ~1% of a core.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

from replicas.env_value import env_value

ENV = "TINYSERVE_LOOP_LAG"
HORIZON_S = 120.0  # NOTE: how far back windows can look; older samples are dropped
LAG_WINDOW_S = 0.1  # NOTE: the window before a stamp that the traces look at


class LoopLag:
    """Samples of (wake-up wall time, lag seconds) of one loop, newest last."""

    def __init__(self, period_s: float) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.period_s = period_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max(16, int(HORIZON_S / period_s)))
        self._task: asyncio.Task[None] | asyncio.Future[None] | None = None
        # NOTE: a sampler may run on another thread's loop than the one that reads it
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> LoopLag | None:
        """A sampler with the period ``TINYSERVE_LOOP_LAG`` (ms) names, or None when unset/0."""
        ms = env_value(ENV, float, "a period in milliseconds")
        return cls(ms / 1e3) if ms is not None and ms > 0 else None

    def ensure_running(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start sampling on ``loop`` (default: the running one; call from a coroutine) —
        idempotent. ``loop`` may belong to another thread."""
        if self._task is not None and not self._task.done():
            return
        if loop is None or loop is _running_loop():
            self._task = asyncio.get_running_loop().create_task(self._run())
        else:
            self._task = asyncio.run_coroutine_threadsafe(self._run(), loop)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        period = self.period_s
        clock = time.perf_counter
        while True:
            t0 = clock()
            await asyncio.sleep(period)
            lag = clock() - t0 - period
            self.record(time.time(), max(0.0, lag))

    def record(self, wall: float, lag_s: float) -> None:
        """Add one sample by hand (tests, or a caller that measures lag itself); samples
        must come in wall-clock order."""
        with self._lock:
            self._samples.append((wall, lag_s))

    def max_between(self, t0: float, t1: float) -> float:
        """The largest lag (s) of the wake-ups whose late stretch overlaps [t0, t1] (wall
        clock): a wake-up at ``w`` with lag ``g`` stood blocked over [w - g, w]. 0.0 if none."""
        worst = 0.0
        with self._lock:
            for wall, lag in reversed(self._samples):
                if wall < t0:
                    break
                if wall - lag <= t1 and lag > worst:
                    worst = lag
        return worst


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def serve_main_loop() -> asyncio.AbstractEventLoop | None:
    """The loop of the Serve replica this code runs in (Serve's main loop: its HTTP server in
    direct-ingress mode, the requests' dispatch to the user-code loop), or None outside a
    replica. NOTE: found through Ray's private worker state, for diagnostics only; a Ray
    upgrade that moves it makes this None, never an error."""
    try:
        from ray._private.worker import global_worker

        actors: dict[Any, Any] = getattr(global_worker, "actors", {}) or {}
        for actor in actors.values():
            loop = getattr(getattr(actor, "_replica_impl", None), "_event_loop", None)
            if isinstance(loop, asyncio.AbstractEventLoop):
                return loop
    except Exception:  # NOTE: diagnostics must never break serving
        return None
    return None
