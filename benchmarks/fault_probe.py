"""What the fault runs read from the app: its strength (live replicas, the selection
service's view of them) and whether routing is cache-aware (probe pairs).

A probe pair sends a fresh ~150-token prefix twice (completions, ``max_tokens`` 1); the
second hits the cache when it is routed to the replica that served the first (the first
leaves the prefix's blocks there). Routing counts as cache-aware again once the app is back
at full strength and ``NUM_HITS`` probe pairs in a row hit: with two replicas a random router
does that by chance once in 2^NUM_HITS.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import requests

from benchmarks.app_cluster import App, actor_names
from benchmarks.mixed_load import prefix_text

NUM_HITS = 4
HIT_TOKENS = 8 * 16  # the probe prefix spans 9+ full blocks of 16 tokens


def probe_hits(app: App, timeout_s: float = 60.0) -> bool:
    """One probe pair; True when the second request hit at least ``HIT_TOKENS``."""
    headers = {"Authorization": f"Bearer {app.key}"} if app.key else {}
    prompt = prefix_text(f"probe-{uuid.uuid4().hex[:8]}") + "\nQuestion"
    cached = -1
    for suffix in (" one?", " two?"):
        r = requests.post(f"{app.base_url}/completions", timeout=timeout_s, headers=headers,
                          json={"model": app.model, "prompt": prompt + suffix, "max_tokens": 1})
        if r.status_code != 200:
            return False
        usage = r.json().get("usage") or {}
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    return cached >= HIT_TOKENS


def _token(app: App) -> str | None:
    from ray import serve

    handle = serve.get_deployment_handle("CacheSelector", app.name)
    token = handle.auth_token.remote().result(timeout_s=10)
    return str(token) if token else None


def auth_metadata(app: App) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that a selection replica of ``app`` accepts (its bearer token, if any)."""
    token = _token(app)
    return (("authorization", f"Bearer {token}"),) if token else ()


def selector_views(app: App) -> dict[str, dict[str, bool]]:
    """Per live selection replica (registry address, dialled over gRPC with the app's token):
    LLM replica id -> synced."""
    import grpc

    from cluster.serve import selector_registry
    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    md = auth_metadata(app)
    out: dict[str, dict[str, bool]] = {}
    for address in selector_registry.live_addresses(app.name):
        with grpc.insecure_channel(address) as ch:
            try:
                resp = pb_grpc.CacheSelectionStub(ch).ListReplicas(
                    pb.ListReplicasRequest(), timeout=5, metadata=md)
            except grpc.RpcError:
                continue
        out[address] = {r.replica_id: r.synced for r in resp.replicas}
    return out


def num_selects(app: App) -> dict[str, int]:
    """Selects answered so far by each live selection replica (replica id -> count)."""
    import grpc

    from cluster.serve import selector_registry
    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    md = auth_metadata(app)
    out: dict[str, int] = {}
    for rid, address in selector_registry.live_replicas(app.name).items():
        with grpc.insecure_channel(address) as ch:
            try:
                stats = pb_grpc.CacheSelectionStub(ch).Stats(pb.StatsRequest(), timeout=5,
                                                             metadata=md)
            except grpc.RpcError:
                continue
        out[rid] = int(stats.num_selects)
    return out


def replica_ids(app: App, deployment: str) -> set[str]:
    return {n.rsplit("#", 1)[-1] for n in actor_names(app, deployment)}


def running(app: App, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app.name].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def full_strength(app: App) -> bool:
    """Every LLM and selection replica running, and every selection replica indexing every
    live LLM replica, synced. NOTE: a killed replica may stay in an index until it expires
    (``stale_after_s``); the router only offers live replicas as candidates, so it is never
    chosen meanwhile."""
    spec = app.spec
    if running(app, "LLMReplica") != spec.num_replicas:
        return False
    if running(app, "CacheSelector") != spec.num_selectors:
        return False
    # NOTE: Serve's status lags a kill by a moment: count the live actors too.
    live = replica_ids(app, "LLMReplica")
    if len(live) != spec.num_replicas:
        return False
    if len(replica_ids(app, "CacheSelector")) != spec.num_selectors:
        return False
    views = selector_views(app)
    return len(views) == spec.num_selectors and all(
        live <= set(v) and all(v[r] for r in live) for v in views.values())


def wait_cache_aware(app: App, since: float, timeout_s: float,
                     victim: tuple[str, str] | None = None) -> dict[str, Any]:
    """Probe until full strength and then ``NUM_HITS`` hits in a row. Returns the seconds
    from ``since`` to the killed replica ``victim`` = (deployment, replica id) being gone
    from Ray's view (a node's death takes Ray's health checks to see), to the first probe
    hit, to full strength (counted only once the victim is gone) and to cache-aware again
    (None when not reached within ``timeout_s``), and the probe counts."""
    deadline = since + timeout_s
    first_hit = strong = aware = gone = None
    streak = num_probes = num_hits = 0
    while time.time() < deadline and aware is None:
        if gone is None and (victim is None or victim[1] not in replica_ids(app, victim[0])):
            gone = time.time() - since
        if gone is not None and strong is None and full_strength(app):
            strong = time.time() - since
            streak = 0  # NOTE: only hits at full strength count toward "cache-aware"
        hit = probe_hits(app)
        num_probes += 1
        num_hits += hit
        if hit and first_hit is None:
            first_hit = time.time() - since
        streak = streak + 1 if hit else 0
        if strong is not None and streak >= NUM_HITS:
            aware = time.time() - since
        if not hit:
            time.sleep(0.2)
    return {"victim_gone_s": gone, "first_probe_hit_s": first_hit, "full_strength_s": strong,
            "cache_aware_s": aware, "num_probes": num_probes, "num_probe_hits": num_hits}


def dry_select(app: App, token_ids: list[int], origin_node_id: str = "",
               policy: str = "tinyserve") -> dict[str, list[Any]]:
    """A what-if ``Select`` (no speculative insert) of ``token_ids`` on every live selection
    replica, over the live LLM replicas: address -> ranked ``pb.RankedReplica`` list."""
    import grpc

    from cluster.serve import selector_registry
    from cluster.serve.router_core import PromptHasher
    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc
    from replicas.config import EngineConfig

    engine = EngineConfig()
    hashes = PromptHasher(engine.block_size, engine.hash_mode)(token_ids)
    md = auth_metadata(app)
    req = pb.SelectRequest(block_hashes=hashes, num_prompt_tokens=len(token_ids),
                           candidate_replica_ids=sorted(replica_ids(app, "LLMReplica")),
                           policy=policy, no_speculative_insert=True,
                           origin_node_id=origin_node_id)  # fmt: skip
    out: dict[str, list[Any]] = {}
    for address in selector_registry.live_addresses(app.name):
        with grpc.insecure_channel(address) as ch:
            out[address] = list(pb_grpc.CacheSelectionStub(ch).Select(
                req, timeout=5, metadata=md).replicas)
    return out
