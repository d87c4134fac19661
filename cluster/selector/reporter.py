"""``KVReporter``: a replica's ReportKV streamer to one selection replica, on a background
thread.

``publish(events)`` numbers and sends kvmanager events, ``snapshot(load)`` sends load; every
(re)connect sends Hello + a full resync built from ``resident_hashes()`` (the pool's cached
block hashes), and so does a service-requested resync after a sequence gap. While
disconnected, events are dropped: the resync on reconnect covers them. ``outcome(o)`` sends a
realised outcome (the reward signal) on the same stream, in order with the events: at most
``MAX_QUEUED_OUTCOMES`` wait at a time, and while disconnected outcomes are dropped for good
(no resync carries them; a learning signal, not state). ``tls``
(``cluster.selector.grpc_tls.ClientTLS``): None dials plaintext.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import grpc

from cluster.selector.client import auth_metadata
from cluster.selector.convert import events_to_proto, load_to_proto, outcome_to_proto
from cluster.selector.grpc_tls import ClientTLS, channel
from cluster.selector.types import LoadSnapshot, Outcome
from kvmanager.events import KVEvent
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc

log = logging.getLogger("tinyserve.selector_client")
_RESYNC_CHUNK = 65536
# NOTE: outcomes waiting on one ReportKV stream; past it an outcome is dropped (never blocks,
# and a stalled stream holds at most this many outcomes ahead of the KV events behind them).
MAX_QUEUED_OUTCOMES = 1024


class KVReporter:
    """ReportKV streamer for one replica (see the module docstring). Thread-safe publish."""

    def __init__(
        self,
        address: str,
        replica_id: str,
        resident_hashes: Callable[[], Iterable[int]] = lambda: (),
        hello: pb.ReplicaHello | None = None,
        token: str | None = None,
        heartbeat_s: float = 1.0,
        retry_s: float = 0.2,
        tls: ClientTLS | None = None,
        max_outcomes: int = MAX_QUEUED_OUTCOMES,
    ) -> None:
        self.address = address
        self._tls = tls
        self.replica_id = replica_id
        self._resident = resident_hashes
        self._hello = hello or pb.ReplicaHello()
        self._md = auth_metadata(token)
        self._heartbeat_s = heartbeat_s
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._seq = 0
        self._queue: queue.Queue[pb.ReportKVRequest] | None = None
        self._max_outcomes = max_outcomes
        self._num_outcomes = 0  # outcomes in self._queue, not yet handed to gRPC
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"kv-reporter-{replica_id}", daemon=True
        )
        self.num_connects = 0
        self.num_resyncs_requested = 0
        self.num_outcomes_dropped = 0
        self.connected = threading.Event()

    def start(self) -> KVReporter:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def publish(self, events: Sequence[KVEvent]) -> int | None:
        """Send one batch; returns its seq, or None while disconnected (dropped: the next resync
        carries the state)."""
        with self._lock:
            if self._queue is None or not events:
                return None
            self._seq += 1
            batch = events_to_proto(self._seq, list(events), time.time())
            self._queue.put(pb.ReportKVRequest(replica_id=self.replica_id, batch=batch))
            return self._seq

    def snapshot(self, load: LoadSnapshot) -> bool:
        with self._lock:
            if self._queue is None:
                return False
            self._queue.put(
                pb.ReportKVRequest(replica_id=self.replica_id, snapshot=load_to_proto(load))
            )
            return True

    def outcome(self, outcome: Outcome) -> bool:
        """Queue a realised outcome behind what this stream already holds, so the service
        applies it after the events published before it (as the unary Feedback, through the
        same core method). Never blocks. False (counted in ``num_outcomes_dropped``) when it is
        dropped: while disconnected, from the service or between two connections (like a
        failed unary Feedback; a reconnect resends the KV state, not outcomes), or when
        ``max_outcomes`` already wait in the queue. True means queued, not delivered: a
        connection (or connection attempt) that ends first loses it, uncounted."""
        with self._lock:
            if self._queue is None or self._num_outcomes >= self._max_outcomes:
                self.num_outcomes_dropped += 1
                return False
            self._num_outcomes += 1
            msg = pb.ReportKVRequest(replica_id=self.replica_id, feedback=outcome_to_proto(outcome))
            self._queue.put(msg)
            return True

    def _open(self) -> queue.Queue[pb.ReportKVRequest]:
        """New per-connection queue, pre-filled with Hello + the full resync (atomically with
        respect to publish, so no batch falls between the resync and the next seq)."""
        q: queue.Queue[pb.ReportKVRequest] = queue.Queue()
        with self._lock:
            q.put(pb.ReportKVRequest(replica_id=self.replica_id, hello=self._hello))
            hashes = list(self._resident())
            chunks = [
                hashes[i : i + _RESYNC_CHUNK] for i in range(0, len(hashes), _RESYNC_CHUNK)
            ] or [[]]
            for i, chunk in enumerate(chunks):
                resync = pb.KVResync(seq=self._seq, block_hashes=chunk, done=i == len(chunks) - 1)
                q.put(pb.ReportKVRequest(replica_id=self.replica_id, resync=resync))
            self._queue = q
            self._num_outcomes = 0  # NOTE: the old queue's outcomes went with it
        return q

    def _messages(
        self, q: queue.Queue[pb.ReportKVRequest], closed: threading.Event
    ) -> Iterator[pb.ReportKVRequest]:
        while not closed.is_set():
            try:
                msg = q.get(timeout=self._heartbeat_s)
            except queue.Empty:
                yield pb.ReportKVRequest(replica_id=self.replica_id, hello=self._hello)  # heartbeat
                continue
            if msg.HasField("feedback"):
                with self._lock:
                    if self._queue is q:  # NOTE: a new connection counts its own queue
                        self._num_outcomes -= 1
            yield msg

    def _run(self) -> None:
        stub = pb_grpc.CacheSelectionStub(channel(self.address, self._tls))  # type: ignore[no-untyped-call]
        while not self._stop.is_set():
            closed = threading.Event()
            q = self._open()
            self.num_connects += 1
            self.connected.set()
            call = stub.ReportKV.future(self._messages(q, closed), metadata=self._md)
            while not self._stop.is_set() and not call.done():
                time.sleep(0.02)
            closed.set()
            with self._lock:
                self._queue = None
            self.connected.clear()
            if self._stop.is_set():
                call.cancel()
                return
            try:
                if call.result().resync_required:
                    self.num_resyncs_requested += 1
                    continue  # reconnect at once with a resync
            except grpc.RpcError as err:
                log.info("ReportKV for %s ended: %s; retrying", self.replica_id, err.code())
            self._stop.wait(self._retry_s)
