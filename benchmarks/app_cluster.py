"""The Serve app on a real Ray cluster of this host, for fault runs, the soak and their tests.

    app = start_app(AppSpec(num_worker_nodes=1, model=str(tiny_dir)))
    ... app.http, app.key, app.model, app.node_ids ...
    stop_app(app)

With ``num_worker_nodes`` > 0 it is a multi-node ``ray.cluster_utils.Cluster`` (one raylet per
node, all on this host): the head node offers the custom resources ``ingress``, ``selector``
and one ``llm``; each worker node one ``llm``; the app pins its deployments with
``placement`` (``cluster.serve.app_config.PlacementSettings``), so the ingress and the selection
service stay on the head and there is exactly one LLM replica per node. A killed worker node
takes its replica with it; ``add_worker_node`` brings a node up for Serve's replacement
replica (what an autoscaler does). With 0 worker nodes it is ``ray.init(address="local")``.

HTTP binds 127.0.0.1 on the head only (``proxy_location: HeadOnly``: every node shares this
host's loopback). Helpers read every LLM replica through the Serve handle (repeated calls
until each replica answered), and the processes' RSS with psutil (same host).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROCESS_TITLE = "ServeReplica:{app}:{deployment}"


@dataclass(slots=True, frozen=True)
class AppSpec:
    model: str = "default"
    num_worker_nodes: int = 0
    num_replicas: int = 2
    num_selectors: int = 2
    num_blocks: int = 256
    max_num_seqs: int = 8
    select_timeout_s: float = 1.0
    default_max_tokens: int = 32
    # NOTE: Ray's defaults (3 s x 5) take ~15 s to declare a killed node dead; kept unless set.
    health_check_period_ms: int = 0
    health_check_failure_threshold: int = 0
    extra_args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class App:
    spec: AppSpec
    name: str
    http: str
    model: str
    key: str
    cluster: Any = None  # ray.cluster_utils.Cluster or None
    head_node_id: str = ""
    workers: dict[str, Any] = field(default_factory=dict)  # node id -> ray Node

    @property
    def base_url(self) -> str:
        return self.http + "/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app_args(spec: AppSpec, key: str, multi_node: bool) -> dict[str, Any]:
    args: dict[str, Any] = {
        "engine": {"model": spec.model, "num_blocks": spec.num_blocks,
                   "max_num_seqs": spec.max_num_seqs, "num_threads": 1},
        "served_model_name": "tiny" if spec.model != "default" else None,
        "num_replicas": spec.num_replicas,
        "num_cpus_per_replica": 1,
        "default_max_tokens": spec.default_max_tokens,
        # NOTE: a generous deadline: a 2-core box running every replica can take longer than
        # the production 50 ms for a Select round trip; faults, not latency, are measured.
        "router_kwargs": {"select_timeout_s": spec.select_timeout_s},
        "selector": {"port": 0, "stale_after_s": 600, "num_replicas": spec.num_selectors,
                     "num_cpus": 0.25},
        "auth": {"enabled": False} if not key else {"api_keys_file": key},
    }
    if multi_node:
        args["placement"] = {"ingress": {"ingress": 1}, "selector": {"selector": 1},
                             "llm": {"llm": 1}}  # fmt: skip
    args.update(spec.extra_args)
    return args


def start_app(spec: AppSpec, key_file: str = "", api_key: str = "") -> App:
    """Start Ray (one node or a multi-node Cluster), Serve on a free loopback port, the app;
    wait until a completion succeeds. ``key_file``/``api_key``: auth on with that key."""
    from ray import serve

    from cluster.serve.app import build_app

    name = f"ts{uuid.uuid4().hex[:6]}"
    cluster, workers = _start_ray_retrying(spec)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                proxy_location="HeadOnly")  # fmt: skip
    serve.run(build_app(_app_args(spec, key_file, cluster is not None)), name=name,
              route_prefix="/")  # fmt: skip
    head = str(cluster.head_node.node_id) if cluster is not None else ""
    model = "tiny" if spec.model != "default" else "smollm2-135m-instruct"
    app = App(spec, name, f"http://127.0.0.1:{port}", model, api_key, cluster, head, workers)
    wait_ready(app)
    return app


def _start_ray(spec: AppSpec) -> tuple[Any, dict[str, Any]]:
    import ray

    if not spec.num_worker_nodes:
        ray.init(address="local", num_cpus=6, include_dashboard=False)
        return None, {}
    from ray.cluster_utils import Cluster

    system: dict[str, Any] = {}
    if spec.health_check_period_ms:
        system["health_check_period_ms"] = spec.health_check_period_ms
    if spec.health_check_failure_threshold:
        system["health_check_failure_threshold"] = spec.health_check_failure_threshold
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "include_dashboard": False, "_system_config": system,
        "resources": {"ingress": 1, "selector": spec.num_selectors, "llm": 1}})
    workers: dict[str, Any] = {}
    for _ in range(spec.num_worker_nodes):
        node = cluster.add_node(num_cpus=2, resources={"llm": 1})
        workers[node.node_id] = node
    ray.init(address=cluster.address)
    return cluster, workers


def _start_ray_retrying(spec: AppSpec, attempts: int = 3) -> tuple[Any, dict[str, Any]]:
    """``_start_ray``, again after a node that did not come up in time.

    NOTE: Ray gives a starting raylet a fixed 30 s to register with the GCS
    (``ray._private.node``); on a loaded 2-core CI box it once missed that. A failed start
    leaves its processes behind, so they are stopped (``ray stop --force``: every Ray process
    of this host, which a test or benchmark run here owns) before the next try."""
    import subprocess
    import sys

    import ray

    for attempt in range(1, attempts):
        try:
            return _start_ray(spec)
        except Exception as e:
            if "timed out during startup" not in str(e):
                raise
            print(f"app_cluster: a Ray node did not start ({e}); try {attempt + 1} of "
                  f"{attempts}", file=sys.stderr)  # fmt: skip
            ray.shutdown()
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                           capture_output=True, timeout=120, check=False)  # fmt: skip
    return _start_ray(spec)  # NOTE: the last try: its failure goes up as it is


def stop_app(app: App) -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        if app.cluster is not None:
            app.cluster.shutdown()


def wait_ready(app: App, timeout_s: float = 300.0) -> None:
    """Until a completion succeeds (readiness means a request works, not a port)."""
    import requests

    headers = {"Authorization": f"Bearer {app.key}"} if app.key else {}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = requests.post(f"{app.base_url}/completions", timeout=60, headers=headers,
                              json={"model": app.model, "prompt": "hi", "max_tokens": 1})
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the app never answered a completion"
        time.sleep(1.0)


# -- reading the replicas ------------------------------------------------------------------------
def each_replica(app: App, method: str, num_replicas: int | None = None,
                 max_calls: int = 64) -> dict[str, dict[str, Any]]:
    """``method`` of every LLM replica (a handle call reaches one; repeat until
    ``num_replicas`` distinct replicas answered, or ``max_calls``)."""
    from ray import serve

    want = app.spec.num_replicas if num_replicas is None else num_replicas
    handle = serve.get_deployment_handle("LLMReplica", app.name)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(max_calls // 8):
        # NOTE: 8 calls at once: Serve's power-of-two spreads concurrent calls, one at a time
        # may keep landing on the same replica.
        calls = [getattr(handle, method).remote() for _ in range(8)]
        for call in calls:
            out = call.result(timeout_s=60)
            seen[out["replica_id"]] = out
        if len(seen) >= want:
            break
    return seen


def selector_stats(app: App) -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("CacheSelector", app.name)
    return dict(handle.stats.remote().result(timeout_s=30))


def actor_names(app: App, deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if f"{app.name}#{deployment}#" in a["name"]]  # fmt: skip


def kill_replica(app: App, deployment: str, replica_id: str) -> None:
    """``ray.kill`` one replica's actor (Serve starts a replacement)."""
    import ray

    (name,) = [n for n in actor_names(app, deployment) if n.endswith(f"#{replica_id}")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def kill_worker_node(app: App, node_id: str) -> None:
    """Kill every process of a worker node at once (no graceful shutdown)."""
    assert app.cluster is not None
    node = app.workers.pop(node_id)
    app.cluster.remove_node(node, allow_graceful=False)


def add_worker_node(app: App) -> str:
    assert app.cluster is not None
    node = app.cluster.add_node(num_cpus=2, resources={"llm": 1})
    app.workers[node.node_id] = node
    return str(node.node_id)


def rss_by_role(app: App) -> dict[str, int]:
    """RSS (bytes) of each live process of the app: ``LLMReplica#<pid>``,
    ``OpenAIIngress#<pid>``, ``CacheSelector#<pid>`` (same host, by process title)."""
    import psutil

    out: dict[str, int] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or ())
            for dep in ("LLMReplica", "OpenAIIngress", "CacheSelector"):
                if PROCESS_TITLE.format(app=app.name, deployment=dep) in cmd:
                    out[f"{dep}#{proc.info['pid']}"] = int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    """Poll ``cond`` until truthy (returned) or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = cond()
        except Exception:  # NOTE: handles and actors come and go during a fault
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(every_s)
