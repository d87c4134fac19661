"""The reporting half of ``LLMReplica``: what a replica reports (``ReplicaLoad``), where
(a ``KVSink``, made from a ``SinkSpec`` by the injected ``SinkFactory``) and the loop that
sends it.

- ``_report_loop`` drains the pool's KV events every ``report_interval_s`` and publishes them;
  every ``SNAPSHOT_EVERY_S`` it snapshots the load to the sink and the replica's gauges.
- ``_ensure_sink`` (re)makes the sink from the selection service's address, resolved again
  once the sink has been disconnected for ``RERESOLVE_AFTER_S``.

Contract: a mixin of ``LLMReplica`` (deployment.py), which builds the state declared below.
NOTE: ``replicas`` never imports ``cluster`` (dependency direction): the sink comes from the
factory the app builder passes (``cluster.serve.app_reporting.SelectorSink``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmanager.events import KVEvent
from kvmanager.metrics import PoolStats
from replicas.config import EngineConfig
from replicas.deployment_metrics import ReplicaMetrics
from replicas.engine import AsyncLLMEngine
from replicas.outputs import RequestOutput
from replicas.ray_node import this_node_id

log = logging.getLogger("ray.serve")
SNAPSHOT_EVERY_S = 0.5
RERESOLVE_AFTER_S = 5.0


@dataclass(slots=True)
class ReplicaLoad:
    """A load/fragmentation snapshot (field names of ``tinyserve.v1.LoadSnapshot``)."""

    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_used_blocks: int
    num_running_reqs: int
    num_waiting_reqs: int
    num_running_tokens: int
    num_waiting_tokens: int
    ttft_ewma_s: float
    step_time_ewma_s: float
    f_total: float
    usage: float
    external_fragmentation: float
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass(slots=True)
class SinkSpec:
    """What a KV sink needs to introduce the replica to the selection service."""

    address: str
    replica_id: str
    node_id: str
    block_size: int
    num_blocks: int
    hash_mode: str
    resident_hashes: Callable[[], list[int]] = field(default=lambda: [])


class KVSink(Protocol):
    """Where a replica's KV events, load and outcomes go. Methods must not block."""

    def publish(self, events: list[KVEvent]) -> None: ...
    def snapshot(self, load: ReplicaLoad) -> None: ...
    def feedback(self, request_id: str, out: RequestOutput) -> None: ...
    def connected(self) -> bool: ...
    def close(self) -> None: ...


SinkFactory = Callable[[SinkSpec], KVSink]


class ReplicaReporting:
    """The report loop and the load snapshot over the state ``LLMReplica`` builds (declared
    here)."""

    config: EngineConfig
    engine: AsyncLLMEngine
    replica_id: str
    metrics: ReplicaMetrics
    _selector: Any
    _sink_factory: SinkFactory | None
    _sink: KVSink | None
    _address: str | None
    _inflight: dict[str, int]
    _ttft_ewma: float
    _tpot_ewma: float
    _interval: float
    _stopping: bool

    def load(self, stats: PoolStats | None = None) -> ReplicaLoad:
        """The load snapshot; ``stats`` (the pool's, just taken) saves taking it again."""
        stats = stats if stats is not None else self.engine.stats()
        tokens = sum(self._inflight.values())
        rates = self.engine.rates()
        return ReplicaLoad(
            num_blocks=stats.num_blocks,
            num_free_blocks=stats.num_free_blocks,
            num_cached_blocks=stats.num_cached_blocks,
            num_used_blocks=stats.num_used_blocks,
            num_running_reqs=stats.num_requests,
            num_waiting_reqs=max(len(self._inflight) - stats.num_requests, 0),
            num_running_tokens=tokens,
            num_waiting_tokens=0,
            ttft_ewma_s=self._ttft_ewma,
            step_time_ewma_s=self._tpot_ewma,
            f_total=stats.f_total,
            usage=stats.usage,
            external_fragmentation=stats.external_fragmentation,
            prefill_tokens_per_s=rates.prefill_tokens_per_s,
            decode_tokens_per_s=rates.decode_tokens_per_s,
        )

    async def _resolve_address(self) -> str | None:
        if self._selector is None:
            return None
        try:
            return str(await asyncio.wait_for(self._selector.address.remote(), timeout=10.0))
        except Exception as exc:  # NOTE: the service may still be starting; retry later.
            log.info("selection service not reachable yet: %r", exc)
            return None

    async def _ensure_sink(self, now: float, disconnected_since: float | None) -> None:
        if self._sink_factory is None or self._selector is None:
            return
        stale = disconnected_since is not None and now - disconnected_since > RERESOLVE_AFTER_S
        if self._sink is not None and not stale:
            return
        address = await self._resolve_address()
        if address is None or (self._sink is not None and address == self._address):
            return
        if self._sink is not None:
            self._sink.close()
        stats = await asyncio.to_thread(self.engine.stats)
        self._address = address
        self._sink = self._sink_factory(
            SinkSpec(
                address=address,
                replica_id=self.replica_id,
                node_id=this_node_id(),
                block_size=stats.block_size,
                num_blocks=stats.num_blocks,
                hash_mode=self.config.hash_mode,
                resident_hashes=self.engine.cached_block_hashes,
            )
        )
        log.info("replica %s reports KV to %s", self.replica_id, address)

    async def _report_loop(self) -> None:
        """Drain events -> sink; snapshot load -> sink and gauges. Never raises."""
        last_snapshot = 0.0
        disconnected_since: float | None = None
        while not self._stopping:
            now = time.monotonic()
            try:
                await self._ensure_sink(now, disconnected_since)
                # NOTE: the pool's readers wait for a running step (the engine lock): off
                # the event loop, or every stream of this replica would stall for a step.
                events = await asyncio.to_thread(self.engine.take_events)
                if events and self._sink is not None:
                    self._sink.publish(events)
                if now - last_snapshot >= SNAPSHOT_EVERY_S:
                    last_snapshot = now
                    stats = await asyncio.to_thread(self.engine.stats)
                    load = self.load(stats)
                    self.metrics.on_pool(stats, len(self._inflight))
                    sparse = await asyncio.to_thread(self.engine.sparse_stats)
                    if sparse is not None:
                        self.metrics.on_sparse(sparse)
                    if self._sink is not None:
                        self._sink.snapshot(load)
                        ok = self._sink.connected()
                        disconnected_since = None if ok else (disconnected_since or now)
            except Exception:  # NOTE: reporting must never take serving down.
                log.exception("KV report loop iteration failed")
            await asyncio.sleep(self._interval)
