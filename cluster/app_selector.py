"""CacheSelector: the cache-selection gRPC service as a one-replica deployment of the app.

The service itself is ``cluster.selector`` (its own engineer's); this deployment only owns
its lifetime: start a ``ServerThread`` on ``host:port`` in the replica, answer
``address()`` ("node_ip:port", what replicas and the router dial), stop on shutdown.
A crashed or killed CacheSelector is restarted by Serve; replicas resync on reconnect, the
router falls back to power-of-two meanwhile and re-resolves the address afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from cluster.app_config import SelectorSettings
from cluster.core import CoreConfig, SelectorCore
from cluster.objective import ObjectiveConfig
from cluster.selector import ServerThread

log = logging.getLogger("ray.serve")


@serve.deployment(name="CacheSelector", num_replicas=1, health_check_period_s=5)
class CacheSelector:
    """Hosts the selection service; Serve methods are control-plane only (not the hot path)."""

    def __init__(self, settings: dict[str, Any], token: str | None = None) -> None:
        import ray

        self.settings = SelectorSettings(**settings)
        self._token = token  # NOTE: every RPC but health needs it (cluster.grpc_auth)
        core = SelectorCore(
            CoreConfig(
                default_policy=self.settings.policy,
                pending_ttl_s=self.settings.pending_ttl_s,
                stale_after_s=self.settings.stale_after_s,
                objective=ObjectiveConfig(learn=self.settings.learn),
            )
        )
        node_ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        host = self.settings.host or node_ip  # NOTE: "" = this node's address only
        self._server = ServerThread(core, host=host, port=self.settings.port, token=token)
        self._server.start()
        if host in ("0.0.0.0", "::"):
            host = node_ip
        self._address = f"{host}:{self._server.port}"
        log.info("cache-selection service listening on %s", self._address)

    def address(self) -> str:
        """Where to dial the service (``host:port``)."""
        return self._address

    def auth_token(self) -> str | None:
        """The token gRPC clients must send (for the router, through its Serve handle)."""
        return self._token

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
        self._server.stop()
