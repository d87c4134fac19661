"""Where the selection service's replicas listen: a heartbeat registry in Ray's internal KV.

Every ``CacheSelector`` replica writes ``tinyserve/selector/<app>/<replica>`` =
``{"address": "host:port", "t": unix time}`` (plus ``"fast_lane": "host:port"`` when it serves
the Select fast lane) every ``HEARTBEAT_S``; ``live_addresses(app)`` lists the entries fresher
than ``max_age_s``, ``live_fast_lanes(app)`` their fast lanes. LLM replicas (``app_reporting.SelectorSink``)
read it to stream their KV events to EVERY selection replica, so each holds the full index;
routers get the list from ``CacheSelector.address()`` and fail over between its entries
(``selector_client``).

NOTE: why a registry: a Serve handle call reaches one replica of a deployment, and a replica
only knows its own address; the selection replicas must be dialled individually (gRPC, not
the handle), so their addresses must be published somewhere every process of the cluster can
read. A replica that dies stops heartbeating and drops out after ``max_age_s`` (its clients
have failed over long before: a dead address fails fast). Needs a connected Ray worker.
"""

from __future__ import annotations

import json
import time

NAMESPACE = "tinyserve"
HEARTBEAT_S = 1.0
MAX_AGE_S = 5.0


def _prefix(app: str) -> bytes:
    return f"tinyserve/selector/{app}/".encode()


def register(app: str, replica: str, address: str, fast_lane: str | None = None) -> None:
    """Publish (or refresh) ``replica``'s address (and its fast lane's) under ``app``."""
    from ray.experimental import internal_kv

    entry: dict[str, object] = {"address": address, "t": time.time()}
    if fast_lane:
        entry["fast_lane"] = fast_lane
    value = json.dumps(entry).encode()
    internal_kv._internal_kv_put(
        _prefix(app) + replica.encode(), value, overwrite=True, namespace=NAMESPACE
    )


def unregister(app: str, replica: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_prefix(app) + replica.encode(), namespace=NAMESPACE)


def parse_entries(values: list[bytes], now: float, max_age_s: float = MAX_AGE_S) -> list[str]:
    """The addresses of the fresh entries, sorted and deduplicated (malformed ones skipped)."""
    out: set[str] = set()
    for raw in values:
        try:
            entry = json.loads(raw)
            if now - float(entry["t"]) <= max_age_s:
                out.add(str(entry["address"]))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(out)


def parse_fast_lanes(
    values: list[bytes], now: float, max_age_s: float = MAX_AGE_S
) -> dict[str, str]:
    """gRPC address -> fast lane address of the fresh entries that publish a lane."""
    out: dict[str, str] = {}
    for raw in values:
        try:
            entry = json.loads(raw)
            if now - float(entry["t"]) <= max_age_s and entry.get("fast_lane"):
                out[str(entry["address"])] = str(entry["fast_lane"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def _entries(app: str) -> dict[str, bytes]:
    from ray.experimental import internal_kv

    prefix = _prefix(app)
    keys = internal_kv._internal_kv_list(prefix, namespace=NAMESPACE)
    values = {
        k[len(prefix) :].decode(): internal_kv._internal_kv_get(k, namespace=NAMESPACE)
        for k in keys
    }
    return {k: v for k, v in values.items() if v}


def live_addresses(app: str, max_age_s: float = MAX_AGE_S) -> list[str]:
    """Addresses of the selection replicas of ``app`` that heartbeated within ``max_age_s``."""
    return parse_entries(list(_entries(app).values()), time.time(), max_age_s)


def live_fast_lanes(app: str, max_age_s: float = MAX_AGE_S) -> dict[str, str]:
    """gRPC address -> fast lane address of the live selection replicas that serve one."""
    return parse_fast_lanes(list(_entries(app).values()), time.time(), max_age_s)


def live_replicas(app: str, max_age_s: float = MAX_AGE_S) -> dict[str, str]:
    """Serve replica id -> address of the live selection replicas of ``app``."""
    now = time.time()
    out = {}
    for replica, raw in _entries(app).items():
        for address in parse_entries([raw], now, max_age_s):
            out[replica] = address
    return out
