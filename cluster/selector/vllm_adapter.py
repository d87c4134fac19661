"""Feed a vLLM engine's ZMQ KV-event stream into the selection index.

vLLM's ``ZmqEventPublisher`` (``vllm.distributed.kv_events``, checked against vLLM 0.33.0):

- PUB socket, 3 frames per batch: ``(topic, seq, payload)``; ``seq`` is an 8-byte big-endian
  counter from 0; ``payload`` is msgpack of ``KVEventBatch`` (array-like: ``[ts, events,
  data_parallel_rank]``), each event a tagged map ``{"type": "BlockStored", ...}`` (older
  releases: a tagged array ``["BlockStored", ...]``; both are accepted).
- ROUTER replay socket: send ``(b"", start_seq 8 bytes BE)`` from a DEALER; it answers
  ``(b"", topic, seq, payload)`` for every buffered batch with seq >= start_seq, then
  ``(b"", b"", -1 as 8 signed bytes, b"")``.

Block hashes arrive as ints (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, the default) or bytes;
both map to the 64-bit external form of ``kvmanager.hashing``. This module does not import
vLLM. The subscriber owns the replica's sequence towards the core: it applies vLLM batches in
seq order, replays gaps, and when the replay buffer no longer covers a gap it counts the loss
(``errors_total{kind="seq_gap"}``) and carries on (vLLM has no snapshot to resync from).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import msgspec
import zmq

from cluster.selector.core import SelectorCore
from kvmanager.events import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)

MASK64 = (1 << 64) - 1
END_SEQ = -1
log = logging.getLogger("tinyserve.vllm_adapter")


def _hash64(h: Any) -> int:
    if isinstance(h, bytes | bytearray):
        return int.from_bytes(h, "big") & MASK64
    if isinstance(h, int) and not isinstance(h, bool):
        return h & MASK64
    raise ValueError(f"block hash of type {type(h).__name__}")


def _medium(m: Any) -> str:
    # NOTE: STORAGE-tier blocks are indexed like host-tier ones (reachable, not on device).
    return MEDIUM_GPU if m in (None, MEDIUM_GPU) else MEDIUM_CPU


def decode_event(raw: Any) -> KVEvent | None:
    """One decoded msgpack event -> our event; None for unknown event types (skipped)."""
    if isinstance(raw, dict):
        kind, get = raw.get("type"), raw.get
    elif isinstance(raw, list | tuple) and raw:
        names = {
            "BlockStored": (
                "type",
                "block_hashes",
                "parent_block_hash",
                "token_ids",
                "block_size",
                "lora_id",
                "medium",
            ),
            "BlockRemoved": ("type", "block_hashes", "medium"),
            "AllBlocksCleared": ("type",),
        }.get(raw[0], ("type",))
        kind, get = raw[0], dict(zip(names, raw, strict=False)).get
    else:
        raise ValueError(f"event is a {type(raw).__name__}")
    if kind == "BlockStored":
        parent = get("parent_block_hash")
        return BlockStored(
            block_hashes=[_hash64(h) for h in get("block_hashes") or ()],
            parent_block_hash=None if parent is None else _hash64(parent),
            token_ids=list(get("token_ids") or ()),
            block_size=int(get("block_size") or 0),
            lora_id=get("lora_id"),
            medium=_medium(get("medium")),
        )
    if kind == "BlockRemoved":
        return BlockRemoved(
            block_hashes=[_hash64(h) for h in get("block_hashes") or ()],
            medium=_medium(get("medium")),
        )
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_batch(payload: bytes) -> list[KVEvent]:
    """msgpack ``KVEventBatch`` payload -> events; ValueError when malformed."""
    try:
        obj = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"payload is not msgpack: {exc}") from exc
    if isinstance(obj, dict):  # NOTE: tolerate a map-encoded batch too
        obj = [obj.get("ts"), obj.get("events")]
    if not isinstance(obj, list) or len(obj) < 2 or not isinstance(obj[1], list):
        raise ValueError("payload is not a KVEventBatch [ts, events, ...]")
    return [ev for ev in (decode_event(raw) for raw in obj[1]) if ev is not None]


class VllmKVSubscriber:
    """Background thread: SUB to ``pub_endpoint`` (+ DEALER to ``replay_endpoint``) and apply
    every batch for ``replica_id`` to ``core``. ``start()`` joins the replica; ``stop()`` ends
    the thread (the replica stays until it expires or leaves)."""

    def __init__(
        self,
        core: SelectorCore,
        replica_id: str,
        pub_endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        block_size: int = 16,
        replay_timeout_s: float = 2.0,
    ) -> None:
        self.core = core
        self.replica_id = replica_id
        self._pub_endpoint = pub_endpoint
        self._replay_endpoint = replay_endpoint
        self._topic = topic.encode()
        self._block_size = block_size
        self._replay_timeout_ms = int(replay_timeout_s * 1000)
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vllm-kv-{replica_id}", daemon=True)
        self.next_seq = 0  # next vLLM seq we expect
        self._core_seq = 0
        self.num_batches = 0
        self.num_lost_batches = 0
        self.num_bad_batches = 0
        self.ready = threading.Event()

    def start(self) -> VllmKVSubscriber:
        self.core.join(self.replica_id, block_size=self._block_size)
        self.core.resync(self.replica_id, 0, [])
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        sub.connect(self._pub_endpoint)
        try:
            if self._replay_endpoint is not None:
                self._replay(0)  # history still in the publisher's buffer
            self.ready.set()
            while not self._stop.is_set():
                if not sub.poll(100):
                    self.core.touch(self.replica_id)  # NOTE: heartbeat while the engine is idle
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 3:
                    self.num_bad_batches += 1
                    continue
                _, seq_b, payload = frames
                seq = int.from_bytes(seq_b, "big", signed=True)
                if seq > self.next_seq and self._replay_endpoint is not None:
                    self._replay(self.next_seq)
                self._apply(seq, payload)
        except Exception:  # NOTE: a broken stream must never take the service down
            log.exception("vLLM KV subscriber for %s stopped", self.replica_id)
        finally:
            sub.close(linger=0)
            self.ready.set()

    def _replay(self, start_seq: int) -> None:
        assert self._replay_endpoint is not None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.connect(self._replay_endpoint)
        try:
            dealer.send_multipart((b"", start_seq.to_bytes(8, "big")))
            while dealer.poll(self._replay_timeout_ms):
                frames = dealer.recv_multipart()
                if len(frames) != 4:
                    self.num_bad_batches += 1
                    continue
                _, _, seq_b, payload = frames
                seq = int.from_bytes(seq_b, "big", signed=True)
                if seq == END_SEQ:
                    return
                self._apply(seq, payload)
            log.warning("replay from %s timed out for %s", start_seq, self.replica_id)
        finally:
            dealer.close(linger=0)

    def _apply(self, seq: int, payload: bytes) -> None:
        if seq < self.next_seq:
            return  # duplicate (seen live and in a replay)
        if seq > self.next_seq:
            self.num_lost_batches += seq - self.next_seq
            self.core.metrics.errors.labels("seq_gap").inc()
            log.warning("%s: vLLM batches %d..%d lost", self.replica_id, self.next_seq, seq - 1)
        self.next_seq = seq + 1
        try:
            events = decode_batch(payload)
        except ValueError as exc:
            self.num_bad_batches += 1
            self.core.metrics.errors.labels("invalid_argument").inc()
            log.warning("%s: bad batch seq=%d: %s", self.replica_id, seq, exc)
            return
        res = self.core.apply_events(self.replica_id, self._core_seq + 1, events)
        if not res.applied:  # NOTE: the replica expired or was removed: rejoin from empty
            self.core.join(self.replica_id, block_size=self._block_size)
            self.core.resync(self.replica_id, self._core_seq, [])
            res = self.core.apply_events(self.replica_id, self._core_seq + 1, events)
        self._core_seq = res.last_seq if res.applied else self._core_seq
        self.num_batches += 1
