"""End to end on a real local Ray cluster: two selection replicas (``selector.num_replicas``),
one killed under load. Every request is still routed by a selection replica (the router's
fallback counter stays at zero), and the replacement Serve starts is resynced by every LLM
replica: it ends up with the same index as its surviving sibling.

Real HTTP, real Serve router, real gRPC between the replicas and the selection service.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from ports import free_port

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

APP = "tinyserve_ha"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def app() -> Iterator[tuple[Any, str]]:
    from cluster.serve.app import build_app

    http_port, metrics_port = free_port(), free_port()
    ray.init(address="local", num_cpus=6, include_dashboard=False,
             _metrics_export_port=metrics_port)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        args = {
            "engine": {"num_blocks": 256, "max_num_seqs": 8, "num_threads": 1},
            "num_replicas": 2,
            "num_cpus_per_replica": 1,
            # NOTE: the production deadline is 50 ms; on a 2-core box running the model on
            # both cores a Select round trip alone can take longer, which would count as a
            # fallback for reasons unrelated to the kill. Failover must happen within it.
            "router_kwargs": {"select_timeout_s": 1.0},
            "selector": {"port": 0, "stale_after_s": 600, "num_replicas": 2, "num_cpus": 0.5},
            "auth": {"enabled": False},  # NOTE: loopback only (serve.start above)
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused",
                               max_retries=0, timeout=120)  # fmt: skip
        yield client, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(client: Any, content: str) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2, temperature=0
    )


def _selector_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "#CacheSelector#" in a["name"]]  # fmt: skip


def _auth() -> tuple[tuple[str, str], ...]:
    """gRPC metadata with the app's selection-service token (cluster.serve.grpc_auth)."""
    from ray import serve

    token = serve.get_deployment_handle("CacheSelector", APP).auth_token.remote().result()
    return (("authorization", f"Bearer {token}"),)


def _indexes() -> dict[str, dict[str, tuple[int, bool]]]:
    """Per live selection replica (from the registry, dialled directly over gRPC): replica_id
    -> (resident blocks, synced)."""
    import grpc

    from cluster.serve import selector_registry
    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    out = {}
    for address in selector_registry.live_addresses(APP):
        with grpc.insecure_channel(address) as ch:
            try:
                resp = pb_grpc.CacheSelectionStub(ch).ListReplicas(
                    pb.ListReplicasRequest(), timeout=5, metadata=_auth()
                )
            except grpc.RpcError:
                continue
        out[address] = {r.replica_id: (r.num_resident_blocks, r.synced) for r in resp.replicas}
    return out


def _num_selects(address: str) -> int:
    import grpc

    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        stats = pb_grpc.CacheSelectionStub(ch).Stats(
            pb.StatsRequest(), timeout=5, metadata=_auth()
        )
    return int(stats.num_selects)


def _counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _check_fast_lanes() -> None:
    """Every selection replica publishes its fast lane, and it answers with the app's token."""
    import asyncio

    from ray import serve

    from cluster.selector.fast_lane_client import FastLaneClient
    from cluster.selector.fast_lane_frames import Kind
    from cluster.serve import selector_registry

    lanes = selector_registry.live_fast_lanes(APP)
    assert set(lanes) == set(selector_registry.live_addresses(APP)), lanes
    token = serve.get_deployment_handle("CacheSelector", APP).auth_token.remote().result()

    async def ping(address: str) -> bytes:
        client = FastLaneClient(address, token)
        try:
            return await client.call(Kind.PING, b"", 10)
        finally:
            await client.close()

    for lane in lanes.values():
        assert asyncio.run(ping(lane)) == b""


def test_killing_a_selection_replica_under_load_needs_no_fallback(app: tuple[Any, str]) -> None:
    client, metrics_url = app
    assert len(_selector_actors()) == 2
    deadline = time.monotonic() + 120
    while not (len(idx := _indexes()) == 2 and all(len(v) == 2 for v in idx.values())):
        assert time.monotonic() < deadline, f"selection replicas never both indexed: {idx}"
        time.sleep(1)
    _check_fast_lanes()
    for i in range(4):  # warm up: routers resolved, prefixes cached
        assert _chat(client, f"Warm up {i}?").choices[0].message.content is not None
    # NOTE: the router sends its Selects over the fast lane (its connection shows in the
    # exported gauge; Ray exports every few seconds)
    _wait_for(lambda: _counter(requests.get(metrics_url, timeout=30).text,
                               "ray_tinyserve_selector_fast_lane_connections") >= 1,
              90, "the router never connected a selector fast lane")  # fmt: skip
    # NOTE: a router's very first request may fall back ("unresolved": it learns the
    # service's address in the background); count only what happens from here on.
    before = _routed_counts(metrics_url, 4)

    done: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(k: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                _chat(client, f"[{k}] shared system prompt. Question {i} {uuid.uuid4().hex[:4]}?")
                done.append(1)
            except BaseException as exc:
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    _wait_for(lambda: len(done) >= 6, 120, "no load before the kill")
    # NOTE: kill the replica the router has been using (the most Selects), so the requests
    # in flight and the next ones must fail over.
    from cluster.serve import selector_registry

    selects = {rid: _num_selects(a) for rid, a in selector_registry.live_replicas(APP).items()}
    busiest = max(selects, key=lambda rid: selects[rid])
    assert selects[busiest] > 0, selects
    (victim,) = [n for n in _selector_actors() if n.endswith(f"#{busiest}")]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    num_at_kill = len(done)
    # load continues through the outage and the restart
    _wait_for(lambda: len(done) >= num_at_kill + 12, 240, "load stalled after the kill")

    def restarted_in_sync() -> bool:
        idx = _indexes()
        if len(idx) != 2 or len(_selector_actors()) != 2 or victim in _selector_actors():
            return False
        views = list(idx.values())
        return (
            len(views[0]) == 2
            and views[0] == views[1]
            and all(synced for _, synced in views[0].values())
        )

    _wait_for(restarted_in_sync, 180, "the restarted selection replica never caught up")
    print(f"restarted selection replica in sync {time.monotonic() - killed_at:.1f} s after the kill")
    _wait_for(lambda: len(done) >= num_at_kill + 18, 240, "load stalled after the restart")
    stop.set()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    # Every request went through the router: it is counted as a decision or a fallback.
    after = _routed_counts(metrics_url, 4 + len(done))
    assert after["decisions"] - before["decisions"] >= len(done), (before, after)
    assert after["fallbacks"] == before["fallbacks"], (before, after)


def _routed_counts(metrics_url: str, num_requests: int) -> dict[str, Any]:
    """Router decisions and fallbacks once the exported counters account for
    ``num_requests`` routed requests (Ray exports metrics every few seconds)."""
    deadline = time.monotonic() + 90
    while True:
        text = requests.get(metrics_url, timeout=30).text
        counts = {
            "decisions": _counter(text, "ray_tinyserve_router_decisions_total"),
            "fallbacks": _counter(text, "ray_tinyserve_router_fallbacks_total"),
        }
        if counts["decisions"] + counts["fallbacks"] >= num_requests:
            counts["series"] = re.findall(r"tinyserve_router_fallbacks_total\{.*reason=\S+", text)
            return counts
        assert time.monotonic() < deadline, (counts, num_requests)
        time.sleep(2)


def _wait_for(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)
