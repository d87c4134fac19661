"""Where clients reach the app's ingress: Serve's HTTP proxy, or the ingress replicas
themselves under Serve's direct ingress.

Direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the environment of every Ray node,
set before ``ray start``, or before ``ray.init`` of a local cluster): each replica of the
app's ingress deployment (``OpenAIIngress``) runs its own HTTP server, on a port Serve hands
out from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` .. ``RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT``
(default 30000-31000, lowest free first; one ingress replica on a fresh node gets the minimum),
bound to Serve's HTTP host. A request to that port skips the proxy's hop and the replica's
callback to the proxy for the request body. No HAProxy is needed on one node; the head's
proxy keeps serving the usual port (8000) as well. Across nodes a load balancer in front of
the replicas' ports (HAProxy, a cloud LB) takes the proxy's place: Serve's HAProxy mode.
"""

from __future__ import annotations

import time
from typing import Any

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def app_http_urls(app_name: str) -> list[str]:
    """Base URLs (``http://host:port``, no route prefix) that serve ``app_name`` now: its
    ingress replicas' own servers under direct ingress, else the HTTP proxies. Needs a
    connected Serve (``serve.start``/``serve.run`` in this process or ``ray.init`` of the
    cluster). A loopback HTTP host (Serve's ``http_options.host``) is used as the address,
    else each target's node IP.

    NOTE: Serve publishes these target groups through its controller only (the API its
    HAProxy mode uses); there is no public call for them in Ray 2.60."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("no Serve instance is connected: call serve.start or serve.run first")
    controller: Any = client._controller
    host = str(client.http_config.host)
    groups = ray.get(controller.get_target_groups.remote(app_name))
    urls = []
    for group in groups:
        if group.protocol != RequestProtocol.HTTP:
            continue
        for target in group.targets:
            address = host if host in LOOPBACK_HOSTS else target.ip
            urls.append(f"http://{address}:{target.port}")
    return urls


def direct_urls(app_name: str, proxy: str, count: int = 1, timeout_s: float = 60.0) -> list[str]:
    """``app_name``'s base urls that are not ``proxy`` (its ingress replicas' own servers under
    direct ingress), once Serve publishes at least ``count`` of them; RuntimeError after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = [u for u in app_http_urls(app_name) if u != proxy]
        if len(urls) >= max(count, 1):
            return urls
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{len(urls)} of {count} direct ingress urls for {app_name} in {timeout_s:.0f} s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.serve.direct_ingress [APP]``: print the app's base URLs, one a
    line (connects to the running Ray cluster, ``address="auto"``)."""
    import argparse
    import logging

    import ray
    from ray import serve

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("app", nargs="?", default="tinyserve", help="Serve application name")
    args = p.parse_args(argv)
    ray.init(address="auto", logging_level=logging.ERROR)
    serve.status()  # NOTE: connects this process's Serve client
    for url in app_http_urls(args.app):
        print(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
