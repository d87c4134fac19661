"""ThreadCore: the engine core on a thread of the caller's process (``tinyserve-engine-core``).

    event loop(s)                       engine-core thread
    submit() -> pending adds  --lock--> apply adds/aborts, step(), step(), ...
    streams  <- route(...)    <-------- one route() call per step (that step's outputs)

The default core (``EngineConfig.engine_process`` off). Every engine mutation happens on this
thread, between steps; readers (stats, events) take the engine's lock, so they wait for at
most one running step. ``replicas.engine_core_proc.ProcessCore`` has the same interface with
the engine in a child process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kvmanager.events import KVEvent
from kvmanager.metrics import PoolStats
from replicas.engine_core_turn import Add, Routed, abort_all, apply_inputs, check_idle, safe_step
from replicas.llm_engine import LLMEngine
from replicas.rate_meter import Rates, calibrate
from replicas.request_limits import RequestLimits
from replicas.sparse import SparseAttentionStats


class ThreadCore:
    """Steps ``engine`` on its own thread (started by the first ``submit``); hands every
    step's outputs to ``route`` (called on that thread)."""

    pid: int | None = None  # NOTE: no process of its own

    def __init__(
        self, engine: LLMEngine, route: Callable[[Routed], None], idle_check_after_s: float
    ) -> None:
        self.engine = engine
        self._route = route
        self.idle_check_after_s = idle_check_after_s
        # NOTE: guards the pending lists and _stopped; the engine itself is touched only by the
        # core thread (and by shutdown() after that thread has ended).
        self._cond = threading.Condition()
        self._pending_adds: list[Add] = []
        self._pending_aborts: list[str] = []
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def limits(self) -> RequestLimits:
        return self.engine.limits

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # -- inputs ----------------------------------------------------------------------------------
    def submit(self, adds: list[Add]) -> None:
        """Queue ``adds`` in one hand-over (one step admits them all); RuntimeError once shut
        down."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("engine is shut down")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="tinyserve-engine-core", daemon=True
                )
                self._thread.start()
            self._pending_adds.extend(adds)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._pending_aborts.append(request_id)
            self._cond.notify()

    # -- the core thread -------------------------------------------------------------------------
    def _run(self) -> None:
        """Apply adds/aborts, step, route outputs; sleep when idle."""
        checked_idle = True
        while True:
            with self._cond:
                while not (
                    self._stopped
                    or self._pending_adds
                    or self._pending_aborts
                    or self.engine.has_unfinished_requests()
                ):
                    if not checked_idle:
                        # NOTE: the check waits for a quiet spell (idle_check_after_s); new work
                        # ends the wait and leaves the check for the next idle spell.
                        if self._cond.wait(timeout=self.idle_check_after_s):
                            continue
                        checked_idle = True
                        self._cond.release()
                        try:
                            check_idle(self.engine)
                        finally:
                            self._cond.acquire()
                        continue
                    self._cond.wait()
                if self._stopped:
                    return
                adds, self._pending_adds = self._pending_adds, []
                aborts, self._pending_aborts = self._pending_aborts, []
            checked_idle = False
            routed = apply_inputs(self.engine, adds, aborts)
            if self.engine.has_unfinished_requests():
                routed.extend(safe_step(self.engine))
            if routed:
                self._route(routed)

    # -- observability ---------------------------------------------------------------------------
    def take_events(self) -> list[KVEvent]:
        return self.engine.take_events()

    def cached_block_hashes(self) -> list[int]:
        return self.engine.cached_block_hashes()

    def stats(self) -> PoolStats:
        return self.engine.stats()

    def check_integrity(self) -> None:
        with self.engine.lock:
            self.engine.kv.check_integrity()

    def rates(self) -> Rates:
        return self.engine.rates.rates()

    def calibrate(self) -> Rates:
        return calibrate(self.engine)

    def sparse_stats(self) -> SparseAttentionStats | None:
        sparse = self.engine.runner.sparse
        return sparse.stats() if sparse is not None else None

    def check_health(self) -> None:
        """RuntimeError when the core cannot serve (shut down)."""
        if self._stopped:
            raise RuntimeError("engine is shut down")

    # -- shutdown --------------------------------------------------------------------------------
    def shutdown(self) -> Routed:
        """Stop the thread after its current step (blocks until it has), then abort
        everything in flight. Returns what the open streams must get."""
        with self._cond:
            self._stopped = True
            adds, self._pending_adds = self._pending_adds, []
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        routed: Routed = [(rid, RuntimeError("engine is shut down")) for rid, *_ in adds]
        return routed + abort_all(self.engine)
