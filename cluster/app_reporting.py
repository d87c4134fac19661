"""SelectorSink: a replica's KVSink backed by the selection service (ReportKV + Feedback).

The replica deployment (``replicas.deployment``) only knows the ``KVSink`` protocol; the app
builder injects ``make_selector_sink`` so that ``replicas`` never imports ``cluster``.

- KV events and load snapshots go over the selector client's ``KVReporter`` stream (its own
  thread; Hello + full resync on every reconnect, so a restarted service catches up).
- Feedback (the realised outcome of a routed request: cached tokens, TTFT) is a unary RPC;
  it runs on one daemon thread behind a bounded queue so the replica's loop never blocks.
  NOTE: when the queue is full the outcome is dropped: it is a learning signal, not state.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import asdict

from cluster.selector_client import KVReporter, SelectorClient
from cluster.types import LoadSnapshot, Outcome
from kvmanager.events import KVEvent
from protos import cache_selection_pb2 as pb
from replicas.deployment import ReplicaLoad, SinkSpec
from replicas.outputs import RequestOutput

log = logging.getLogger("tinyserve.app_reporting")
FEEDBACK_QUEUE_SIZE = 1024


class SelectorSink:
    """KVSink over gRPC to the selection service at ``spec.address``."""

    def __init__(self, spec: SinkSpec, token: str | None = None) -> None:
        hello = pb.ReplicaHello(
            node_id=spec.node_id,
            block_size=spec.block_size,
            num_blocks=spec.num_blocks,
            hash_mode=spec.hash_mode,
        )
        self.replica_id = spec.replica_id
        self.reporter = KVReporter(
            spec.address, spec.replica_id, spec.resident_hashes, hello=hello, token=token
        ).start()
        self._client = SelectorClient(spec.address, token=token)
        self._outcomes: queue.Queue[Outcome | None] = queue.Queue(FEEDBACK_QUEUE_SIZE)
        self._thread = threading.Thread(
            target=self._feedback_loop, name=f"feedback-{spec.replica_id}", daemon=True
        )
        self._thread.start()

    def publish(self, events: list[KVEvent]) -> None:
        self.reporter.publish(events)

    def snapshot(self, load: ReplicaLoad) -> None:
        self.reporter.snapshot(LoadSnapshot(**asdict(load)))

    def feedback(self, request_id: str, out: RequestOutput) -> None:
        outcome = Outcome(
            request_id=request_id,
            replica_id=self.replica_id,
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            ttft_s=out.metrics.ttft_s or 0.0,
            num_output_tokens=out.num_output_tokens,
        )
        with contextlib.suppress(queue.Full):
            self._outcomes.put_nowait(outcome)

    def connected(self) -> bool:
        return self.reporter.connected.is_set()

    def close(self) -> None:
        self.reporter.stop(timeout_s=2.0)
        with contextlib.suppress(queue.Full):
            self._outcomes.put_nowait(None)
        self._thread.join(timeout=2.0)
        self._client.close()

    def _feedback_loop(self) -> None:
        while True:
            outcome = self._outcomes.get()
            if outcome is None:
                return
            try:
                self._client.feedback(outcome)
            except Exception as exc:  # NOTE: a caller bug shows in the log, never in serving.
                log.warning("feedback for %s failed: %r", outcome.request_id, exc)


def make_selector_sink(spec: SinkSpec, token: str | None = None) -> SelectorSink:
    """The ``SinkFactory`` the app builder injects into every LLM replica (``token``: the
    selection service's, bound by ``cluster.grpc_auth.TokenSinkFactory``)."""
    return SelectorSink(spec, token=token)
