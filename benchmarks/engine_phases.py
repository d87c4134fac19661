"""Host time per phase of an engine's steps (engine_gpu_bench.py's ``step_phase_ms``): wraps
the engine's scheduler, runner, sampler and asynchronous resolve with timers."""

from __future__ import annotations

import time
from typing import Any

from replicas.llm_engine import LLMEngine


class _TimedSampler:
    """The engine's sampler with both entry points timed as the "sample" phase."""

    def __init__(self, inner: Any, wrap: Any) -> None:
        self._call = wrap("sample", inner)
        self.sample = wrap("sample", inner.sample)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)


class PhaseTimes:
    """Host wall time per phase of the engine's steps while ``on`` (wraps the engine's parts):
    schedule, execute (staging + launches; the GPU runs asynchronously), sample (synchronous
    loop: includes waiting for the GPU, its device->host copy is the step's one sync;
    asynchronous loop: the launches only), resolve (asynchronous loop only: waiting for the
    previous step's tokens + output processing); the rest of a step is scheduler.update +
    output processing (synchronous) or bookkeeping (asynchronous)."""

    PHASES = ("schedule", "execute", "sample", "resolve")

    def __init__(self, engine: LLMEngine) -> None:
        self.on = False
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        engine.scheduler.schedule = self._wrap("schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
        engine.runner.execute = self._wrap("execute", engine.runner.execute)  # type: ignore[method-assign]
        engine.sampler = _TimedSampler(engine.sampler, self._wrap)  # type: ignore[assignment]

    def attach_stepper(self, engine: LLMEngine) -> None:
        """Time the asynchronous loop's resolve (call after switching it on)."""
        stepper = engine._stepper
        if stepper is not None:
            stepper.drain = self._wrap("resolve", stepper.drain)  # type: ignore[method-assign]

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - t

        return timed

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, dict.fromkeys(self.PHASES, 0.0)
        return out
