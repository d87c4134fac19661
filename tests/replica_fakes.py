"""An LLMReplica without Serve or an engine: the deployment's class over a given (fake) engine,
for tests of its ``generate`` (imported as ``tests.replica_fakes``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from replicas.deployment import LLMReplica
from replicas.output_pacing import StreamBudget
from replicas.output_post import OutputPost


class _Replica(LLMReplica.func_or_class):  # type: ignore[name-defined,misc]
    def __del__(self) -> None:  # NOTE: the real one is Serve's async shutdown hook
        pass


def fake_replica(engine: Any, post: OutputPost | None = None) -> Any:
    """The replica's serving state, uncapped pacing, no sink, no loop-lag sampling."""
    replica = object.__new__(_Replica)
    replica.engine = engine
    replica._stopping, replica._inflight, replica._sink = False, {}, None
    replica._ttft_ewma = replica._tpot_ewma = 0.0
    replica.metrics = SimpleNamespace(on_finished=lambda out: None)
    replica._stream_budget = StreamBudget(0.0)
    replica._loop_lag = None
    replica._post = post
    replica._early = None
    return replica
