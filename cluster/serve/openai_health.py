"""``/health``: is there an LLM replica that can take a request?

``ReplicaHealth.read(app)`` asks Serve's controller for the LLM deployment's replica states
(``serve.status()``) and answers how many replicas are RUNNING out of how many are wanted;
``healthy`` when at least one runs. The ingress caches the answer for ``CACHE_S`` so that a
probe storm costs the controller one call a second, and reads it off the event loop (the call
blocks).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

LLM_DEPLOYMENT = "LLMReplica"
CACHE_S = 1.0


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    """The LLM deployment as Serve's controller sees it."""

    num_running: int
    num_replicas: int  # every replica Serve tracks (starting, running, stopping...)
    deployment_status: str

    @property
    def healthy(self) -> bool:
        return self.num_running > 0

    def body(self) -> dict[str, Any]:
        return {"status": "ok" if self.healthy else "unavailable", "replicas": asdict(self)}

    @classmethod
    def read(cls, app_name: str) -> ReplicaHealth:
        from ray import serve

        try:
            app = serve.status().applications[app_name]
            dep = app.deployments[LLM_DEPLOYMENT]
        except Exception as exc:  # NOTE: controller unreachable or app gone: not healthy
            return cls(0, 0, f"unknown: {type(exc).__name__}")
        states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
        return cls(states.get("RUNNING", 0), sum(states.values()),
                   str(getattr(dep.status, "value", dep.status)))


class HealthCache:
    """``get()`` re-reads at most once per ``CACHE_S``."""

    def __init__(self, app_name: str) -> None:
        self.app_name = app_name
        self._last: ReplicaHealth | None = None
        self._at = 0.0

    async def get(self) -> ReplicaHealth:
        now = time.monotonic()
        if self._last is None or now - self._at > CACHE_S:
            self._last = await asyncio.to_thread(ReplicaHealth.read, self.app_name)
            self._at = now
        return self._last
