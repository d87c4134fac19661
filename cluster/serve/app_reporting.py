"""SelectorSink: a replica's KVSink backed by the selection service (ReportKV streams).

The replica deployment (``replicas.deployment``, its reporting half in
``replicas.deployment_report``) only knows the ``KVSink`` protocol; the app builder injects
``make_selector_sink`` so that ``replicas`` never imports ``cluster``.

- KV events and load snapshots go to EVERY selection replica, one ``KVReporter`` stream each
  (its own thread; Hello + full resync on every reconnect, so a restarted service catches up).
  ``spec.address`` lists the replicas known at start (comma-separated); ``directory`` (the
  registry of ``cluster.serve.selector_registry`` in the app) is re-read every ``refresh_s``: a new
  selection replica gets a stream (and so a full resync) within about that long, one that
  left the directory and is disconnected loses its stream.
- Feedback (the realised outcome of a routed request: cached tokens, TTFT) rides the same
  streams (``KVReporter.outcome``), to every selection replica (each keeps its own reward
  history), in order with the KV events; ``feedback`` never blocks the replica's loop.
  NOTE: an outcome is dropped when its stream's queue already holds ``MAX_QUEUED_OUTCOMES``
  outcomes, and for a selection replica that is disconnected at the time (the unary call this
  replaced was dropped on failure too): it is a learning signal, not state. One unary call per
  request and selection replica cost the service ~0.2 ms of CPU each (notes: "Path capacity").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict

from cluster.selector.client import split_addresses
from cluster.selector.grpc_tls import ClientTLS
from cluster.selector.reporter import KVReporter
from cluster.selector.types import LoadSnapshot, Outcome
from kvmanager.events import KVEvent
from protos import cache_selection_pb2 as pb
from replicas.deployment_report import ReplicaLoad, SinkSpec
from replicas.outputs import RequestOutput

log = logging.getLogger("tinyserve.app_reporting")


class SelectorSink:
    """KVSink over gRPC to every selection replica (see the module docstring)."""

    def __init__(
        self,
        spec: SinkSpec,
        token: str | None = None,
        directory: Callable[[], list[str]] | None = None,
        refresh_s: float = 1.0,
        tls: ClientTLS | None = None,
    ) -> None:
        self._hello = pb.ReplicaHello(
            node_id=spec.node_id,
            block_size=spec.block_size,
            num_blocks=spec.num_blocks,
            hash_mode=spec.hash_mode,
        )
        self._spec, self._token, self._directory = spec, token, directory
        self._tls = tls
        self.replica_id = spec.replica_id
        self._lock = threading.Lock()
        self.reporters: dict[str, KVReporter] = {}
        for address in split_addresses(spec.address):
            self._add(address)
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if directory is not None:
            self._refresher = threading.Thread(
                target=self._refresh_loop,
                args=(refresh_s,),
                name=f"selector-directory-{spec.replica_id}",
                daemon=True,
            )
            self._refresher.start()

    @property
    def reporter(self) -> KVReporter:
        """The first stream (single-replica callers and tests)."""
        return next(iter(self.reporters.values()))

    def _add(self, address: str) -> None:
        self.reporters[address] = KVReporter(
            address,
            self.replica_id,
            self._spec.resident_hashes,
            hello=self._hello,
            token=self._token,
            tls=self._tls,
        ).start()

    def refresh(self) -> None:
        """Follow the directory: stream to new selection replicas, drop vanished ones."""
        if self._directory is None:
            return
        try:
            live = set(self._directory())
        except Exception as exc:  # NOTE: a directory outage keeps the current streams.
            log.info("selection directory unavailable: %r", exc)
            return
        with self._lock:
            for address in sorted(live - set(self.reporters)):
                log.info("replica %s also reports KV to %s", self.replica_id, address)
                self._add(address)
            for address in sorted(set(self.reporters) - live):
                rep = self.reporters[address]
                if not rep.connected.is_set() and len(self.reporters) > 1:
                    rep.stop(timeout_s=0.5)
                    del self.reporters[address]

    def _refresh_loop(self, refresh_s: float) -> None:
        while not self._stop.wait(refresh_s):
            self.refresh()

    def _each(self) -> list[KVReporter]:
        with self._lock:
            return list(self.reporters.values())

    def publish(self, events: list[KVEvent]) -> None:
        for rep in self._each():
            rep.publish(events)

    def snapshot(self, load: ReplicaLoad) -> None:
        snap = LoadSnapshot(**asdict(load))
        for rep in self._each():
            rep.snapshot(snap)

    def feedback(self, request_id: str, out: RequestOutput) -> None:
        """Hand the outcome to every selection replica's stream (dropped where it cannot be
        queued: module docstring)."""
        outcome = Outcome(
            request_id=request_id,
            replica_id=self.replica_id,
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            ttft_s=out.metrics.ttft_s or 0.0,
            num_output_tokens=out.num_output_tokens,
        )
        for rep in self._each():
            rep.outcome(outcome)

    def connected(self) -> bool:
        """True while at least one selection replica receives this replica's stream."""
        return any(rep.connected.is_set() for rep in self._each())

    def close(self) -> None:
        self._stop.set()
        for rep in self._each():
            rep.stop(timeout_s=2.0)
        if self._refresher is not None:
            self._refresher.join(timeout=2.0)


def make_selector_sink(
    spec: SinkSpec, token: str | None = None, tls: ClientTLS | None = None
) -> SelectorSink:
    """The ``SinkFactory`` the app builder injects into every LLM replica: streams to every
    selection replica the app's registry lists (``token`` and ``tls``: the selection
    service's, bound by ``cluster.serve.grpc_auth.TokenSinkFactory``)."""
    from ray import serve

    from cluster.serve import selector_registry

    app = serve.get_replica_context().app_name
    return SelectorSink(
        spec, token=token, directory=lambda: selector_registry.live_addresses(app), tls=tls
    )
