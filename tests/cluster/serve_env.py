"""A private local Ray cluster with Serve flags in its environment, for the e2e tests of
Serve's ingress modes (direct ingress, HAProxy)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ports import free_port


@contextmanager
def serve_with_env(env: dict[str, str], num_cpus: int = 4) -> Iterator[str]:
    """Set ``env`` (Serve reads it in its controller and replicas, which inherit this process's
    environment), start Ray and Serve's HTTP on a free loopback port; yields the base url.
    Serve and Ray are shut down and the environment restored on exit."""
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
