"""CacheSelector: the cache-selection gRPC service as a deployment of the app
(``selector.num_replicas`` replicas, default 2).

Each replica runs a full, independent service (``ServerThread`` on ``host:port``, or any free
port when a sibling on the same node holds it) and heartbeats its address into the app's
registry (``cluster.serve.selector_registry``). Every LLM replica streams its KV events to every
registered selection replica, so each holds the full index; ``address()`` answers the live
list ("ip:port,ip:port"), which the router's client fails over between within one Select
deadline. A killed replica is restarted by Serve; the LLM replicas see it in the registry
within a second and resync it in full, so no request needs the power-of-two fallback while
one selection replica is up. Beside gRPC each replica serves the Select fast lane
(``selector.fast_lane_port``, ``cluster.selector.fast_lane``; not with TLS), published in the
same registry entry: ``fast_lanes()`` maps each address to its lane for the router. Its
``tinyserve_selector_*`` metrics reach Ray's metrics port through
``cluster.serve.metrics_mirror``.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from ray import serve

from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.grpc_tls import ClientTLS, ServerTLS
from cluster.selector.server import ServerThread
from cluster.serve import selector_registry
from cluster.serve.app_config import SelectorSettings
from cluster.serve.metrics_mirror import MetricsMirror
from replicas.niceness import apply_niceness

log = logging.getLogger("ray.serve")


def bindable(host: str, port: int) -> bool:
    """Whether a TCP listener could bind ``host:port`` now (False while another holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@serve.deployment(name="CacheSelector", num_replicas=2, health_check_period_s=5)
class CacheSelector:
    """Hosts the selection service; Serve methods are control-plane only (not the hot path)."""

    def __init__(
        self,
        settings: dict[str, Any],
        token: str | None = None,
        tls: ServerTLS | None = None,
        client_tls: ClientTLS | None = None,
    ) -> None:
        import ray

        apply_niceness()
        # NOTE: ``settings`` comes without ``tls`` (its files may exist only where the app was
        # deployed): ``tls`` / ``client_tls`` are the PEM bytes read there (cluster.selector.grpc_tls).
        self.settings = SelectorSettings(**settings)
        self._token = token  # NOTE: every RPC but health needs it (cluster.serve.grpc_auth)
        self._tls, self._client_tls = tls, client_tls
        core = SelectorCore(
            CoreConfig(
                default_policy=self.settings.policy,
                pending_ttl_s=self.settings.pending_ttl_s,
                stale_after_s=self.settings.stale_after_s,
                objective=self.settings.objective_config(),
            )
        )
        node_ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        host = self.settings.host or node_ip  # NOTE: "" = this node's address only
        self._server = self._start(core, host, token)
        if host in ("0.0.0.0", "::"):
            host = node_ip
        self._address = f"{host}:{self._server.port}"
        lane = self._server.fast_lane_address
        self._fast_lane = f"{host}:{lane.rpartition(':')[2]}" if lane else None
        ctx = serve.get_replica_context()
        self._app, self._replica = ctx.app_name, ctx.replica_id.unique_id
        selector_registry.register(self._app, self._replica, self._address, self._fast_lane)
        self._stopping = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name="selector-registry", daemon=True
        )
        self._heartbeat.start()
        # NOTE: the core's tinyserve_selector_* series, exported by Ray (cluster.serve.metrics_mirror)
        self._mirror = MetricsMirror(core.metrics.registry).start()
        log.info(
            "cache-selection service listening on %s (%s), fast lane %s",
            self._address,
            "TLS" if tls is not None else "plaintext",
            self._fast_lane or "off",
        )

    def _start(self, core: SelectorCore, host: str, token: str | None) -> ServerThread:
        """Serve on the configured ports, or on any free ones when a sibling holds them."""
        lane = self.settings.fast_lane_port
        # NOTE: a taken port is not offered to gRPC: its failed bind logs an error line (on
        # every `make run`, where two selection replicas share the node).
        if all(bindable(host, p) for p in (self.settings.port, lane) if p):
            try:
                return ServerThread(core, host=host, port=self.settings.port, token=token,
                                    tls=self._tls, fast_lane_port=lane).start()  # fmt: skip
            except RuntimeError:
                if not self.settings.port and not lane:
                    raise
        log.info("port %d or %s taken (a sibling selection replica?): any free port",
                 self.settings.port, lane)  # fmt: skip
        return ServerThread(core, host=host, port=0, token=token, tls=self._tls,
                            fast_lane_port=None if lane is None else 0).start()  # fmt: skip

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(selector_registry.HEARTBEAT_S):
            try:
                selector_registry.register(
                    self._app, self._replica, self._address, self._fast_lane
                )
            except Exception as exc:  # NOTE: the GCS may blip; the next beat retries.
                log.info("selector registry heartbeat failed: %r", exc)

    def address(self) -> str:
        """Where to dial the service: every live selection replica, this one first
        (``"host:port,host:port"``; the selector client fails over between them)."""
        try:
            others = selector_registry.live_addresses(self._app)
        except Exception:  # NOTE: the registry is an optimisation over our own address.
            others = []
        return ",".join([self._address, *(a for a in others if a != self._address)])

    def fast_lanes(self) -> dict[str, str]:
        """gRPC address -> Select fast lane address of every live selection replica that
        serves one, this one included (the router's client prefers the lane)."""
        try:
            lanes = selector_registry.live_fast_lanes(self._app)
        except Exception:  # NOTE: as in address(): the registry is an optimisation
            lanes = {}
        if self._fast_lane:
            lanes[self._address] = self._fast_lane
        return lanes

    def own_address(self) -> str:
        """This replica's own ``host:port``."""
        return self._address

    def auth_token(self) -> str | None:
        """The token gRPC clients must send (for the router, through its Serve handle)."""
        return self._token

    def client_tls(self) -> ClientTLS | None:
        """How gRPC clients verify this service (None: it serves plaintext)."""
        return self._client_tls

    def stats(self) -> dict[str, Any]:
        """The core's counters, for tests and operators."""
        st = self._server.core.stats()
        replicas = [
            {
                "replica_id": r.replica_id,
                "num_resident_blocks": r.num_resident_blocks,
                "connected": r.connected,
                "synced": r.synced,
            }
            for r in self._server.core.list_replicas()
        ]
        return {
            "num_replicas": st.num_replicas,
            "num_unique_blocks": st.num_unique_blocks,
            "counters": st.counters,
            "decisions": st.decisions,
            "replicas": replicas,
        }

    def check_health(self) -> None:
        if self._server._running is None:  # NOTE: stopped server = unhealthy replica.
            raise RuntimeError("selection server is not running")

    def __del__(self) -> None:
        self._stopping.set()
        self._mirror.stop()
        try:
            selector_registry.unregister(self._app, self._replica)
        except Exception as exc:  # NOTE: it expires from the registry anyway.
            log.info("selector registry unregister failed: %r", exc)
        self._server.stop()
