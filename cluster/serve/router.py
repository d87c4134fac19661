"""TinyServeRouter: Serve request router that asks the cache-selection service.

Configured per deployment through ``request_router_config``:

    request_router_class: cluster.serve.router:TinyServeRouter
    request_router_kwargs: {block_size: 16, hash_mode: fast, select_timeout_s: 0.05}

For each request: hash the prompt's token ids into chained block hashes (the pools' own
function), ``Select(hashes, candidates)`` with a tight deadline, and hand Serve the ranking as
one-replica rank groups (Serve tries the next group only if the better replica is full).
With a single candidate there is nothing to rank: the request goes to it at once and its
Select (the service's bookkeeping: pending marks, in-flight load, the reward's prediction)
runs beside it on the router loop, started once Serve has assigned the request.
The request itself is also written to the replica handed to Serve first, over a same-node
socket, before Serve's call leaves (``early_send``; ``replicas.early_start``): the replica starts
it and Serve's call claims it. Routing degrades, never fails: when the service is unknown, slow
or down, or the request carries no token ids, the request goes through Serve's power-of-two
choices (no early start then).

Metrics (Serve API, labelled with the ingress deployment that owns the handle):
``tinyserve_router_decisions{policy}``, ``tinyserve_router_fallbacks{reason}``,
``tinyserve_selector_latency_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from ray.serve._private import constants as serve_constants
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from cluster.selector.client import AsyncSelectorClient
from cluster.selector.core_types import Selection
from cluster.selector.grpc_tls import ClientTLS, TLSSettings
from cluster.serve.early_send import EarlySender
from cluster.serve.router_core import (
    PromptHasher,
    PromptInfo,
    RouterSettings,
    prompt_info,
    ranks_from_selection,
    select_kwargs,
)
from replicas.ray_node import this_node_id

log = logging.getLogger("ray.serve")
RESOLVE_TIMEOUT_S = 10.0  # each call to the CacheSelector deployment while resolving it
LATENCY_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25]


class _RouterMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.decisions = metrics.Counter(
            "tinyserve_router_decisions",
            description="Requests routed by the selection service, by policy.",
            tag_keys=("policy",),
        )
        self.fallbacks = metrics.Counter(
            "tinyserve_router_fallbacks",
            description="Requests routed by the power-of-two fallback, by reason.",
            tag_keys=("reason",),
        )
        self.latency = metrics.Histogram(
            "tinyserve_selector_latency_seconds",
            description="Select round trip seen by the router (answered calls only).",
            boundaries=LATENCY_BUCKETS_S,
        )


class TinyServeRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Cache-aware router; see the module docstring. Not FIFO on purpose: a replica chosen for
    one request's prefix must serve that request, not the oldest pending one."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.settings = RouterSettings.from_kwargs(kwargs)
        self._hasher = PromptHasher(self.settings.block_size, self.settings.hash_mode)
        self._address: str | None = self.settings.selector_address
        # NOTE: a standalone service (``selector_address``) takes its token from the env;
        # the app's own is fetched with its address (cluster.serve.grpc_auth).
        self._token: str | None = os.environ.get("TINYSERVE_SELECTOR_TOKEN") or None
        # NOTE: a standalone service's CA comes from the kwargs; the app's with its token.
        self._tls: ClientTLS | None = TLSSettings(
            ca_file=self.settings.tls_ca_file, server_name=self.settings.tls_server_name
        ).client()
        # NOTE: the app's service publishes its fast lanes (gRPC address -> lane address);
        # a standalone one's come from the kwargs (gRPC only without them).
        self._fast_lanes: dict[str, str] = self.settings.fast_lanes()
        self._client: AsyncSelectorClient | None = None
        self._client_key: tuple[str, tuple[tuple[str, str], ...]] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._resolving = False
        self._failures = 0
        self._metrics = _RouterMetrics()
        # NOTE: the router runs in the ingress replica's process: its node is the origin.
        self._origin_node_id = this_node_id()
        self._early = EarlySender(self._origin_node_id)
        self.num_decisions = 0
        self.num_fallbacks = 0
        # NOTE: requests sent to their only candidate without waiting for its Select
        self.num_unwaited = 0
        self._beside: set[asyncio.Task[None]] = set()

    # -- selection service address ------------------------------------------------------------
    def _resolve_in_background(self) -> None:
        """Ask the CacheSelector deployment for its address, token and fast lanes, in the
        background (called from the router's loop).

        NOTE: where Serve runs routers on the caller's loop (``serve_main_loop``), a handle can
        only be called from a running loop: a task on this one. Where Serve runs them on its
        own router thread, a handle made on that thread blocks it (the new handle's router
        waits on the same loop): a thread of ours, with a loop of its own."""
        if self._resolving:
            return
        self._resolving = True
        if serve_constants.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP:
            threading.Thread(target=asyncio.run, args=(self._resolve(),),
                             name="tinyserve-router-resolve", daemon=True).start()
        else:
            self._spawn(self._resolve())

    async def _resolve(self) -> None:
        from ray import serve

        try:
            handle = serve.get_deployment_handle(self.settings.selector_deployment, self.app_name)
            token = await asyncio.wait_for(handle.auth_token.remote(), RESOLVE_TIMEOUT_S)
            self._token = str(token) if token else None
            self._tls = await asyncio.wait_for(handle.client_tls.remote(), RESOLVE_TIMEOUT_S)
            self._fast_lanes = await self._fetch_fast_lanes(handle)
            address = await asyncio.wait_for(handle.address.remote(), RESOLVE_TIMEOUT_S)
            self._address = str(address)
            self._failures = 0
        except Exception as exc:
            log.info("TinyServeRouter: selection service address unknown: %r", exc)
        finally:
            self._resolving = False

    @staticmethod
    async def _fetch_fast_lanes(handle: Any) -> dict[str, str]:
        """The service's fast lanes; none when it cannot say (e.g. a version without them):
        the client then uses gRPC only."""
        try:
            lanes = await asyncio.wait_for(handle.fast_lanes.remote(), RESOLVE_TIMEOUT_S)
            return {str(k): str(v) for k, v in dict(lanes).items()}
        except Exception as exc:
            log.info("TinyServeRouter: no selector fast lanes: %r", exc)
            return {}

    def _get_client(self) -> AsyncSelectorClient | None:
        address = self._address
        if address is None:
            self._resolve_in_background()
            return None
        key = (address, tuple(sorted(self._fast_lanes.items())))
        if self._client is None or self._client_key != key:
            # NOTE: grpc.aio channels bind to the running loop: create it on the router loop.
            if self._client is not None:
                self._retire(self._client)
            self._client = AsyncSelectorClient(
                address,
                token=self._token,
                timeout_s=self.settings.select_timeout_s,
                tls=self._tls,
                fast_lanes=self._fast_lanes,
            )
            self._client_key = key
        return self._client

    def _retire(self, client: AsyncSelectorClient) -> None:
        """Close a replaced client on the router loop once its calls in flight are past
        their deadline (a Select never outlives ``select_timeout_s``)."""

        async def close_later() -> None:
            await asyncio.sleep(2 * self.settings.select_timeout_s)
            await client.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring.add(task)  # NOTE: a reference, or the task may be collected unfinished
        task.add_done_callback(self._retiring.discard)

    # -- routing -------------------------------------------------------------------------------
    async def _fallback(
        self,
        reason: str,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None,
    ) -> list[list[RunningReplica]]:
        self.num_fallbacks += 1
        self._metrics.fallbacks.inc(tags={"reason": reason})
        return await PowerOfTwoChoicesRequestRouter.choose_replicas(
            self,  # type: ignore[arg-type]
            candidate_replicas=candidate_replicas,
            pending_request=pending_request,
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Rank groups for one request: the service's order, or power-of-two."""
        info = prompt_info(pending_request.args) if pending_request is not None else None
        if info is None or not candidate_replicas:
            return await self._fallback("no_tokens", candidate_replicas, pending_request)
        client = self._get_client()
        if client is None:
            return await self._fallback("unresolved", candidate_replicas, pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if len(candidate_replicas) == 1:
            # NOTE: one candidate: no answer can change the choice, so the request leaves
            # now and its Select (the service's pending marks, in-flight load and reward
            # prediction) runs beside it, not before it: a round trip off the TTFT. It starts
            # once Serve has assigned the request (its future done), so that the hashing and
            # the send do not run on this loop ahead of the call to the replica.
            ids = list(by_id)
            future = getattr(pending_request, "future", None)
            if future is not None and not future.done():
                future.add_done_callback(
                    lambda _: self._run_beside(self._select(client, info, ids))
                )
            else:
                self._run_beside(self._select(client, info, ids))
            self.num_unwaited += 1
            if pending_request is not None:
                pending_request.routing_context.should_backoff = True
            self._send_early(candidate_replicas[0], info)
            return [candidate_replicas]
        selection = await self._selected(self._select(client, info, list(by_id)))
        if selection is None:
            return await self._fallback("outage", candidate_replicas, pending_request)
        ranks = ranks_from_selection(selection, by_id, self.settings.max_ranked)
        if not ranks:
            return await self._fallback("empty", candidate_replicas, pending_request)
        self._count_decision(selection)
        if pending_request is not None:
            # NOTE: if every ranked replica rejects, Serve retries with backoff, not a spin.
            pending_request.routing_context.should_backoff = True
        self._send_early(ranks[0][0], info)
        return ranks

    def _send_early(self, replica: RunningReplica, info: PromptInfo) -> None:
        """Start the request on ``replica`` before Serve's call leaves (``early_send``)."""
        if self.settings.early_start:
            self._early.send(replica.routing_stats, info.request)

    async def _select(
        self, client: AsyncSelectorClient, info: PromptInfo, replica_ids: list[str]
    ) -> Selection | None:
        """One Select for the request ``info`` among ``replica_ids`` (its prompt hashed here)."""
        return await client.select(
            self._hasher(info.prompt_token_ids),
            len(info.prompt_token_ids),
            **select_kwargs(info, self.settings, replica_ids, self._origin_node_id),
        )

    async def _selected(self, select: Awaitable[Selection | None]) -> Selection | None:
        """Await one Select: the service's answer, or None (an outage or a refused call;
        enough of them in a row and the service's address is resolved again)."""
        start = time.perf_counter()
        try:
            selection = await select
        except (ValueError, PermissionError) as exc:  # NOTE: caller bug; still serve it.
            log.warning("TinyServeRouter: Select refused: %s", exc)
            selection = None
        if selection is None:
            self._failures += 1
            if self._failures >= self.settings.reresolve_after_failures:
                self._failures = 0
                self._resolve_in_background()
            return None
        self._failures = 0
        self._metrics.latency.observe(time.perf_counter() - start)
        return selection

    def _count_decision(self, selection: Selection) -> None:
        self.num_decisions += 1
        self._metrics.decisions.inc(tags={"policy": selection.policy})

    def _run_beside(self, select: Awaitable[Selection | None]) -> None:
        """Run a Select whose answer nobody waits for, on the router loop (bounded by its
        deadline); a failure is logged, never raised."""

        async def run() -> None:
            try:
                selection = await self._selected(select)
                if selection is not None and selection.ranked:
                    self._count_decision(selection)
            except Exception:
                log.exception("TinyServeRouter: a Select beside its request failed")

        self._spawn(run())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task on the router loop, referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._beside.add(task)  # NOTE: a reference, or the task may be collected unfinished
        task.add_done_callback(self._beside.discard)
