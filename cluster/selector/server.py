"""Run the cache-selection service: ``python -m cluster.selector --port 50051``.

Binds 127.0.0.1 unless ``--host`` says otherwise. Serves ``tinyserve.v1.CacheSelection``, the
standard ``grpc.health.v1.Health`` service and server reflection; optional shared-token auth
(``--token`` or ``$TINYSERVE_SELECTOR_TOKEN``), optional TLS (``--tls-cert``/``--tls-key``,
``cluster.selector.grpc_tls``), Prometheus metrics (``--metrics-port``), the Select fast lane
(``--fast-lane-port``, ``cluster.selector.fast_lane``: plaintext, so not with TLS) and
vLLM ZMQ KV-event subscriptions (``--vllm replica_id=tcp://host:5557[@tcp://host:5558]``,
the part after ``@`` being the replay endpoint).

Embedding: ``start_server(core, ...)`` inside a running event loop, or ``ServerThread`` to run
one on a private loop from synchronous code (tests, benchmarks, a Serve deployment).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import threading
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.selector import wire
from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.fast_lane import FastLane, start_fast_lane
from cluster.selector.grpc_decode import DecodeErrorInterceptor
from cluster.selector.grpc_tls import ServerTLS, TLSSettings
from cluster.selector.objective import ObjectiveConfig
from cluster.selector.objective_settings import objective_from_mapping, parse_assignments
from cluster.selector.servicer import CacheSelectionServicer, TokenAuthInterceptor
from protos import cache_selection_pb2 as pb
from protos import cache_selection_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheSelection"].full_name
# NOTE: the largest legitimate message is a resync chunk (65,536 hashes, < 1 MB) or a Select
# of max_prompt_blocks hashes; 16 MB leaves room and refuses memory-hungry garbage.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
log = logging.getLogger("tinyserve.selector")


@dataclass(slots=True)
class RunningServer:
    server: grpc.aio.Server
    port: int
    core: SelectorCore
    _expiry: asyncio.Task[None] | None = None
    fast_lane: FastLane | None = None

    async def stop(self, grace_s: float = 0.5) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self.fast_lane is not None:
            await self.fast_lane.close()
        await self.server.stop(grace_s)


async def _expire_loop(core: SelectorCore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        # NOTE: off the event loop: forgetting a big replica is O(its blocks); Ping/health stay live.
        for rid in await asyncio.to_thread(core.expire_stale):
            log.info("replica %s expired (silent > %.1fs)", rid, core.config.stale_after_s)


class _Capture:
    """Stands in for a server to catch the generated code's method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def add_servicer(
    server: grpc.aio.Server, servicer: CacheSelectionServicer, select_codec: str = "wire"
) -> None:
    """Register ``CacheSelection`` on ``server``. ``select_codec="wire"`` (default) serves
    Select as bytes through ``servicer.select_wire`` (``cluster.selector.wire``); ``"proto"``
    through protobuf objects (``servicer.Select``), as every other method."""
    if select_codec not in ("wire", "proto"):
        raise ValueError(f"select_codec must be 'wire' or 'proto', got {select_codec!r}")
    cap = _Capture()
    pb_grpc.add_CacheSelectionServicer_to_server(servicer, cap)  # type: ignore[no-untyped-call]
    handlers = cap.handlers
    if select_codec == "wire":
        wire.warm_up()
        # NOTE: no (de)serializers: the behaviour gets and returns the message bytes
        handlers["Select"] = grpc.unary_unary_rpc_method_handler(servicer.select_wire)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def start_server(
    core: SelectorCore | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    expire_interval_s: float | None = None,
    tls: ServerTLS | None = None,
    select_codec: str = "wire",
    reuse_port: bool = False,
    fast_lane_port: int | None = None,
) -> RunningServer:
    """Start serving on ``host:port`` (0 = a free port) in the running loop; returns the bound
    port. ``tls``: serve TLS only (plaintext clients fail their handshake). ``select_codec``:
    see ``add_servicer``. ``reuse_port``: share ``port`` with other processes that set it
    too (SO_REUSEPORT: the kernel spreads new connections over them); correct only when each
    of them gets every KV event another way (a ReportKV stream lands on one of them; see the
    NOTE below). ``fast_lane_port``: also serve Select on the fast lane there (0 = a free
    port; None = no lane; never with ``tls``: the lane is plaintext, so a TLS service
    leaves it closed and its clients use gRPC). The caller owns ``stop()``."""
    core = core or SelectorCore()
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if token:
        interceptors.append(
            TokenAuthInterceptor(token, core.metrics.errors.labels("unauthenticated").inc)
        )
    # NOTE: after auth: an unauthenticated peer is refused before its bytes are parsed.
    interceptors.append(DecodeErrorInterceptor(core.metrics.errors.labels("malformed").inc))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # NOTE: gRPC sets SO_REUSEPORT by default; then a second selection replica on the
            # same node would share the port and the kernel would split one replica's
            # streams between two indexes. Off: a taken port is an error the caller handles.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    add_servicer(server, CacheSelectionServicer(core), select_codec)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bind = f"{host}:{port}"
    bound = (
        server.add_secure_port(bind, tls.credentials())
        if tls is not None
        else server.add_insecure_port(bind)
    )
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    lane = None
    if fast_lane_port is not None and tls is not None:
        log.info("no Select fast lane: it is plaintext and this service serves TLS")
    elif fast_lane_port is not None:
        try:
            lane = await start_fast_lane(core, host, fast_lane_port, token)
        except OSError as exc:
            await server.stop(0)
            raise RuntimeError(f"could not bind the fast lane on {host}:{fast_lane_port}") from exc
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # NOTE: this loop also drains expired speculative inserts, so it runs at least every TTL/2.
    default_interval = min(core.config.stale_after_s / 4, core.config.pending_ttl_s / 2)
    interval = expire_interval_s if expire_interval_s is not None else max(default_interval, 0.05)
    task = asyncio.get_running_loop().create_task(_expire_loop(core, interval))
    return RunningServer(server, bound, core, task, lane)


class ServerThread:
    """A selection server on its own event loop thread (for synchronous callers).

    ``with ServerThread(core) as st: st.port`` ... stops on exit."""

    def __init__(
        self,
        core: SelectorCore | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        tls: ServerTLS | None = None,
        select_codec: str = "wire",
        reuse_port: bool = False,
        fast_lane_port: int | None = None,
    ) -> None:
        self.core = core or SelectorCore()
        self._fast_lane_port = fast_lane_port
        self._args = (host, port, token)
        self._tls = tls
        self._select_codec = select_codec
        self._reuse_port = reuse_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="selector-server", daemon=True
        )
        self._running: RunningServer | None = None

    @property
    def port(self) -> int:
        assert self._running is not None, "server not started"
        return self._running.port

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._running is not None

    @property
    def address(self) -> str:
        return f"{self._args[0]}:{self.port}"

    @property
    def fast_lane_address(self) -> str | None:
        """``host:port`` of the Select fast lane, None when it serves none."""
        assert self._running is not None, "server not started"
        lane = self._running.fast_lane
        return f"{self._args[0]}:{lane.port}" if lane is not None else None

    def start(self) -> ServerThread:
        self._thread.start()
        host, port, token = self._args
        fut = asyncio.run_coroutine_threadsafe(
            start_server(self.core, host, port, token, tls=self._tls,
                         select_codec=self._select_codec, reuse_port=self._reuse_port,
                         fast_lane_port=self._fast_lane_port),
            self._loop,
        )
        try:
            self._running = fut.result(timeout=30)
        except BaseException:
            self.stop()  # NOTE: e.g. the port is taken: do not leak the loop thread
            raise
        return self

    def stop(self) -> None:
        if self._running is not None:
            asyncio.run_coroutine_threadsafe(self._running.stop(0.2), self._loop).result(timeout=30)
            self._running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cluster.selector", description="TinyServe cache-selection service"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = pick a free one)")
    p.add_argument("--policy", default="tinyserve", help="default policy name")
    p.add_argument(
        "--token", default=os.environ.get("TINYSERVE_SELECTOR_TOKEN"), help="shared auth token"
    )
    p.add_argument("--tls-cert", default="", metavar="PEM", help="serve TLS: certificate chain")
    p.add_argument("--tls-key", default="", metavar="PEM", help="serve TLS: private key")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="share --port with other processes (SO_REUSEPORT; the kernel spreads "
        "connections): only when each gets every KV event another way (e.g. --vllm), since "
        "a ReportKV stream lands on one process",
    )
    p.add_argument(
        "--select-codec",
        choices=("wire", "proto"),
        default="wire",
        help="Select through the compiled wire codec (default) or protobuf objects",
    )
    p.add_argument(
        "--fast-lane-port",
        type=int,
        default=None,
        help="also serve Select on this port over the fast lane (length-prefixed frames, "
        "cluster/selector/fast_lane.py; 0 = a free port; default off; plaintext: not with TLS)",
    )
    p.add_argument("--pending-ttl-s", type=float, default=2.0)
    p.add_argument("--stale-after-s", type=float, default=30.0)
    p.add_argument("--learn", action="store_true", help="learn the objective's w from Feedback")
    p.add_argument(
        "--objective",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ObjectiveConfig override, value as JSON (e.g. alpha_load=3, 'w=[2,1,4,1]')",
    )
    p.add_argument(
        "--vllm",
        action="append",
        default=[],
        metavar="ID=PUB[@REPLAY]",
        help="subscribe to a vLLM engine's KV events",
    )
    ns = p.parse_args(argv)
    try:
        ns.objective_config = objective_from_args(ns.objective, ns.learn)
        ns.tls = TLSSettings(cert_file=ns.tls_cert, key_file=ns.tls_key).server()
    except ValueError as exc:  # NOTE: pydantic's ValidationError is a ValueError
        p.error(str(exc))
    return ns


def objective_from_args(items: list[str], learn: bool = False) -> ObjectiveConfig:
    """The CLI's ObjectiveConfig: ``--objective KEY=VALUE`` items, then ``--learn``."""
    cfg = objective_from_mapping(parse_assignments(items))
    return replace(cfg, learn=True) if learn else cfg


async def _serve(ns: argparse.Namespace) -> None:
    config = CoreConfig(
        default_policy=ns.policy,
        pending_ttl_s=ns.pending_ttl_s,
        stale_after_s=ns.stale_after_s,
        objective=ns.objective_config,
    )
    core = SelectorCore(config)
    if ns.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(ns.metrics_port, addr=ns.host, registry=core.metrics.registry)
    subscribers = []
    for spec in ns.vllm:
        from cluster.selector.vllm_adapter import VllmKVSubscriber

        replica_id, _, endpoints = spec.partition("=")
        pub, _, replay = endpoints.partition("@")
        subscribers.append(VllmKVSubscriber(core, replica_id, pub, replay or None).start())
    if ns.token and ns.tls is None and ns.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("the token travels in clear on %s: add --tls-cert/--tls-key", ns.host)
    running = await start_server(core, ns.host, ns.port, ns.token, tls=ns.tls,
                                 select_codec=ns.select_codec, reuse_port=ns.reuse_port,
                                 fast_lane_port=ns.fast_lane_port)  # fmt: skip
    log.info(
        "cache-selection service on %s:%d (policy %s, %s)",
        ns.host,
        running.port,
        ns.policy,
        "TLS" if ns.tls else "plaintext",
    )
    print(f"listening on {ns.host}:{running.port}", flush=True)
    if running.fast_lane is not None:
        print(f"fast lane on {ns.host}:{running.fast_lane.port}", flush=True)
    try:
        await running.server.wait_for_termination()
    finally:
        for sub in subscribers:
            sub.stop()
        with contextlib.suppress(Exception):
            await running.stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ns = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(ns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
