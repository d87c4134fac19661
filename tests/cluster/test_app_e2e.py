"""End to end on a real local Ray cluster: the Serve app from ``build_app`` (SmolLM2 on CPU,
2 replicas, the selection service, TinyServeRouter), real HTTP through the ``openai`` client.

One Ray cluster and one app for the whole module (they take ~1 min to start on 2 cores).
The fault-injection tests run last: they kill the selection service, then an LLM replica.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from ports import free_port

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

APP = "tinyserve"
MODEL = "smollm2-135m-instruct"
KEY = "sk-e2e-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_PROMPT_TOKENS = 1000
NUM_BLOCKS = 256
# NOTE: Ray's own labels on every series (camelCase, not ours); dropped before promtool lint.
RAY_LABELS = ("Component", "NodeAddress", "SessionName", "Version", "WorkerId")


@dataclass
class Cluster:
    http: str
    dashboard: str
    metrics: str
    client: Any
    main_loop: bool  # the app's serve_main_loop


# NOTE: the whole module runs on both of Serve's loop layouts: the app's default (handlers and
# the router on the replicas' main loops) and Serve's own (a user-code thread, a router thread).
@pytest.fixture(scope="module", params=[True, False], ids=["main_loop", "serve_threads"])
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from cluster.serve.app import build_app

    key_file = tmp_path_factory.mktemp("auth") / "api_keys"
    key_file.write_text(f"# e2e\n{KEY}\n")
    http_port, dash_port, metrics_port = free_port(), free_port(), free_port()
    ray.init(address="local", num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dash_port, _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        args = {
            "engine": {"num_blocks": NUM_BLOCKS, "max_num_seqs": 8, "num_threads": 1},
            "num_replicas": 2,
            "num_cpus_per_replica": 1,
            # NOTE: a generous deadline: this checks routing decisions, not latency, on a
            # 2-core machine where the model saturates both cores.
            "router_kwargs": {"select_timeout_s": 1.0},
            # NOTE: one selection replica: the outage test below checks the power-of-two fallback
            # (two replicas fail over instead: test_selector_replication_e2e.py).
            "selector": {"port": 0, "stale_after_s": 600, "num_replicas": 1},
            "auth": {"api_keys_file": str(key_file)},
            "limits": {"max_prompt_tokens": MAX_PROMPT_TOKENS},
            "serve_main_loop": request.param,
            # NOTE: above Ray's 15, which needs no privilege (replicas/niceness.py)
            "niceness": 16,
            # NOTE: on by default only with the engine core's process (CUDA); tested here on
            # the thread core
            "early_start": True,
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{http_port}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0,
                               timeout=120)
        yield Cluster(base, f"http://127.0.0.1:{dash_port}",
                      f"http://127.0.0.1:{metrics_port}/metrics", client, request.param)
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(c: Cluster, content: str, system: str = "", **kw: Any) -> Any:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    return c.client.chat.completions.create(model=MODEL, messages=messages,
                                            **{"max_tokens": 4, "temperature": 0, **kw})


def _prefix(tag: str) -> str:
    # ~150 tokens: 9 full blocks of 16 tokens shared by the siblings.
    return f"[{tag}] You are a careful assistant for topic {tag}. " + " ".join(
        f"Rule {i}: answer about {tag} precisely." for i in range(12))


def _selector_stats() -> dict[str, Any]:
    return serve.get_deployment_handle("CacheSelector", APP).stats.remote().result(
        timeout_s=30)


def _replica_stats(rounds: int = 12) -> dict[str, dict[str, Any]]:
    """Stats of every LLM replica (a handle call reaches one replica; repeat to see all)."""
    handle = serve.get_deployment_handle("LLMReplica", APP)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        st = handle.stats.remote().result(timeout_s=30)
        seen[st["replica_id"]] = st
    return seen


def _actor_names(deployment: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if f"#{deployment}#" in a["name"]]


# -- API ----------------------------------------------------------------------------------------
def test_models_health_chat_stream_and_completion(cluster: Cluster) -> None:
    assert requests.get(f"{cluster.http}/health", timeout=30).status_code == 200
    assert [m.id for m in cluster.client.models.list().data] == [MODEL]

    chat = _chat(cluster, "What is 2+2?", max_tokens=6)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 6 and chat.choices[0].finish_reason == "length"

    chunks = list(_chat(cluster, "Count to five.", max_tokens=5, stream=True,
                        stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5

    comp = cluster.client.completions.create(model=MODEL, prompt="The capital of France is",
                                             max_tokens=3, temperature=0, logprobs=2)
    assert comp.choices[0].text and comp.usage.completion_tokens == 3
    assert len(comp.choices[0].logprobs.token_logprobs) == 3
    # Greedy decoding is deterministic across replicas.
    again = cluster.client.completions.create(model=MODEL, prompt="The capital of France is",
                                              max_tokens=3, temperature=0)
    assert again.choices[0].text == comp.choices[0].text


def test_serve_main_loop_and_niceness_reach_the_replicas(cluster: Cluster) -> None:
    # NOTE: serve_main_loop reaches the replicas through their runtime_env; this test process,
    # the driver, was started without it and keeps Serve's defaults.
    separate = not cluster.main_loop
    want = {"user_code_in_separate_thread": separate, "router_in_separate_loop": separate}
    ingress = serve.get_deployment_handle("OpenAIIngress", APP)
    assert ingress.serve_loops.remote().result(timeout_s=30) == want
    stats = _replica_stats()
    assert stats and all(st["serve_loops"] == want for st in stats.values())
    assert all(st["niceness"] == 16 for st in stats.values())
    from ray.serve._private import constants

    assert constants.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD


def test_an_idle_ingress_tokenizes_a_long_prompt_on_its_loop(cluster: Cluster) -> None:
    ingress = serve.get_deployment_handle("OpenAIIngress", APP)
    ingress.traces.remote().result(timeout_s=30)  # forget earlier requests
    prompt = "hello " * 400  # NOTE: over ingress_inline_tokenize_chars (2,048): idle rule only
    body = cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                             temperature=0)
    traces = {t["response_id"]: t for t in ingress.traces.remote().result(timeout_s=30)}
    assert traces[body.id]["tokenized_inline"] is True
    assert traces[body.id]["split_allowed"] is True  # NOTE: idle: pieces allowed
    assert body.usage.prompt_tokens > 300


def test_ingress_traces_give_every_hop_of_a_request_in_order(cluster: Cluster) -> None:
    ingress = serve.get_deployment_handle("OpenAIIngress", APP)
    ingress.traces.remote().result(timeout_s=30)  # forget earlier requests
    inbox = ingress.inbox_stats.remote().result(timeout_s=30)
    chunks = list(_chat(cluster, "Name a colour.", max_tokens=5, stream=True,
                        extra_body={"ignore_eos": True}))
    # NOTE: one ingress, replicas on its node: the streamed outputs came over its inbox.
    posted = ingress.inbox_stats.remote().result(timeout_s=30)["frames"] - inbox["frames"]
    body = cluster.client.completions.create(model=MODEL, prompt="Red, green and", max_tokens=3,
                                             temperature=0, extra_body={"ignore_eos": True})
    traces = {t["response_id"]: t for t in ingress.traces.remote().result(timeout_s=30)}
    assert set(traces) == {chunks[0].id, body.id}
    for rid, num_tokens in ((chunks[0].id, 5), (body.id, 3)):
        t = traces[rid]
        # One host, one wall clock: the stamps follow the request's path.
        path = ["recv", "parsed", "tokenized", "replica_recv", "engine_add", "engine_first_token",
                "replica_first_yield", "first_out", "last_out", "last_sent"]
        stamps = [t[k] for k in path]
        assert all(s > 0 for s in stamps) and stamps == sorted(stamps), t
        assert t["engine_first_token"] <= t["engine_finish"] <= t["last_out"]
        assert 1 <= t["num_outputs_received"] == t["num_outputs"] <= num_tokens
        assert 0 < t["detokenize_s"] < t["engine_finish"] - t["engine_add"]
        assert t["hop_sum_s"] >= 0
    assert posted == traces[chunks[0].id]["num_outputs"]


def test_requests_start_early_and_serves_call_claims_them(cluster: Cluster) -> None:
    """The router writes each request to its replica before Serve's call leaves
    (replicas/early_start.py): the replica's counts and the trace show the claim, the answer
    is the usual one, and no early run was wasted."""
    ingress = serve.get_deployment_handle("OpenAIIngress", APP)
    want = cluster.client.completions.create(model=MODEL, prompt="One, two, three,",
                                             max_tokens=3, temperature=0).choices[0].text
    # NOTE: a replica's socket reaches the router with its routing stats (every 2 s), and the
    # first request to a replica opens the connection: a few requests may go the usual way.
    claimed: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while not claimed and time.monotonic() < deadline:
        ingress.traces.remote().result(timeout_s=30)  # forget earlier requests
        body = cluster.client.completions.create(model=MODEL, prompt="One, two, three,",
                                                 max_tokens=3, temperature=0)
        assert body.choices[0].text == want
        t = {x["response_id"]: x for x in ingress.traces.remote().result(timeout_s=30)}[body.id]
        if t["replica_claim"]:
            claimed = t
        else:
            time.sleep(0.5)
    assert claimed, "no request was started early within 60 s"
    assert 0 < claimed["tokenized"] < claimed["replica_recv"] <= claimed["replica_claim"]
    counts = [st["early_starts"] for st in _replica_stats().values()]
    assert sum(c["claimed"] for c in counts) >= 1
    assert sum(c["expired"] + c["failed"] for c in counts) == 0


def test_bad_requests_get_openai_errors_and_disturb_nothing(cluster: Cluster) -> None:
    url = f"{cluster.http}/v1/chat/completions"
    cases = [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9},
         400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
         400, None),
    ]
    for body, status, param in cases:
        r = requests.post(url, json=body, timeout=60, headers=AUTH)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"]
        if param:
            assert err["param"] is not None and err["param"].startswith(param)
    r = requests.post(url, data=b"{not json", timeout=30,
                      headers={"content-type": "application/json", **AUTH})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert _chat(cluster, "still fine?").choices[0].message.content


def test_shared_prefix_lands_on_one_replica_and_hits_its_cache(cluster: Cluster) -> None:
    # NOTE: with random (power-of-two) placement each sibling would hit with p=1/2; all four
    # hitting by chance is 1/16. A router's very first request may be routed before it has
    # resolved the service's address (power-of-two, "unresolved"): warm it up first.
    _chat(cluster, "Warm up?")
    decisions = _selector_stats()["decisions"].get("tinyserve", 0)
    for tag in ("alpha", "bravo", "charlie", "delta"):
        first = _chat(cluster, "Question one?", system=_prefix(tag))
        second = _chat(cluster, "Another question?", system=_prefix(tag))
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens >= 8 * 16, tag
    stats = _selector_stats()
    assert stats["decisions"].get("tinyserve", 0) - decisions >= 8
    assert stats["num_replicas"] == 2 and all(r["synced"] for r in stats["replicas"])


def test_concurrent_requests_sharing_the_chat_template_reach_both_replicas(
    cluster: Cluster,
) -> None:
    """Issue 20: the chat template is a short prefix every request shares. With each replica's
    own measured prefill rate (~10^2 tokens/s here, not the H100 default 30000) the queue a
    burst builds on one replica costs seconds, so the burst spreads; before, 6 of 6 concurrent
    streams went to one replica. Work is read from each pool's prefix_query_tokens."""
    before = _replica_stats()
    assert len(before) == 2
    for st in before.values():  # measured at start and reported, not a constant
        assert 0 < st["prefill_tokens_per_s"] < 30000.0, st
    decisions = _selector_stats()["decisions"].get("tinyserve", 0)
    n = 6
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            _chat(cluster, f"Tell me fact number {i} about rivers.", max_tokens=24,
                  extra_body={"ignore_eos": True})
        except BaseException as exc:  # NOTE: surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    after = _replica_stats()
    work = {rid: after[rid]["prefix_query_tokens"] - before[rid]["prefix_query_tokens"]
            for rid in before}
    assert _selector_stats()["decisions"].get("tinyserve", 0) >= decisions + n
    assert all(w > 0 for w in work.values()), work
    mean = sum(work.values()) / len(work)
    print(f"template burst: prompt tokens per replica {sorted(work.values())}, "
          f"imbalance max/mean {max(work.values()) / mean:.2f}")


def test_a_request_can_ask_for_its_own_routing_policy(cluster: Cluster) -> None:
    before = _selector_stats()["decisions"].get("round_robin", 0)
    for i in range(3):
        out = _chat(cluster, f"policy probe {i}", extra_body={"routing_policy": "round_robin"})
        assert out.choices[0].message.content
    assert _selector_stats()["decisions"].get("round_robin", 0) == before + 3
    r = requests.post(f"{cluster.http}/v1/chat/completions", timeout=30, headers=AUTH, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}],
        "routing_policy": "fastest_please"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "routing_policy"


def test_client_disconnect_aborts_on_the_replica(cluster: Cluster) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    with requests.post(f"{cluster.http}/v1/chat/completions", json=body, stream=True,
                       timeout=60, headers=AUTH) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
        assert sum(s["num_inflight"] for s in _replica_stats().values()) == 1
    # 400 tokens take well over a minute here; an aborted request is gone in seconds.
    deadline = time.monotonic() + 20
    while sum(s["num_inflight"] for s in _replica_stats().values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sum(s["num_inflight"] for s in _replica_stats().values()) == 0


# -- trust: API keys, limits, health -------------------------------------------------------------
def test_every_api_route_needs_the_key_and_health_shows_the_replicas(cluster: Cluster) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    calls = [("get", "/v1/models", None), ("post", "/v1/chat/completions", chat),
             ("post", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})]
    for headers in ({}, {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": KEY}):
        for method, path, body in calls:
            r = requests.request(method, cluster.http + path, json=body, headers=headers,
                                 timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    bad = openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="sk-wrong-key-0123456789",
                        max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for method, path, body in calls:
        r = requests.request(method, cluster.http + path, json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
    health = requests.get(f"{cluster.http}/health", timeout=30)  # probes carry no key
    assert health.status_code == 200
    assert health.json()["replicas"]["num_running"] == 2


def _post(c: Cluster, path: str, **kw: Any) -> requests.Response:
    return requests.post(c.http + path, timeout=60, **{"headers": AUTH, **kw})


def test_limits_and_malformed_input_get_openai_4xx_and_disturb_nothing(
        cluster: Cluster) -> None:
    msg = [{"role": "user", "content": "x"}]
    chat = {"model": MODEL, "messages": msg, "max_tokens": 1}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/completions", {"model": MODEL, "prompt": [-1]}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**7]}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [5] * (MAX_PROMPT_TOKENS + 1)},
         "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "hello " * 200_000}, "prompt"),
        ("/v1/chat/completions", {**chat, "stop": [f"s{i}" for i in range(17)]}, "stop"),
        ("/v1/chat/completions", {**chat, "stop": "x" * 257}, "stop"),
        ("/v1/chat/completions", {**chat, "stop_token_ids": list(range(65))}, "stop_token_ids"),
        ("/v1/chat/completions", {**chat, "session_id": "s" * 257}, "session_id"),
        ("/v1/chat/completions", {**chat, "messages": msg * 1025}, "messages"),
        ("/v1/chat/completions", {**chat, "tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {**chat, "functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {**chat, "messages": [
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}, *msg]},
         "messages[0].tool_calls"),
        ("/v1/chat/completions", {**chat, "max_token": 3}, "max_token"),
        ("/v1/chat/completions", {**chat, "stream": True, "stop": ["x"] * 17}, "stop"),
    ]
    for path, body, param in cases:
        r = _post(cluster, path, json=body)
        assert r.status_code == 400, (param, r.text[:300])
        assert r.json()["error"]["param"] == param, r.text[:300]
    # Lone surrogates, as a JSON escape (Python's json would refuse to write them).
    for path, raw in (("/v1/completions", '{"model": "%s", "prompt": "a\\ud800b"}'),
                      ("/v1/chat/completions", '{"model": "%s", "messages": '
                       '[{"role": "user", "content": "\\udfff"}]}')):
        r = _post(cluster, path, data=(raw % MODEL).encode(),
                  headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    big = b'{"model": "x", "prompt": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    r = _post(cluster, "/v1/completions", data=big,
              headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert _chat(cluster, "still fine?").choices[0].message.content


def test_selection_service_refuses_clients_without_the_app_token(cluster: Cluster) -> None:
    import grpc

    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    handle = serve.get_deployment_handle("CacheSelector", APP)
    address = handle.address.remote().result(timeout_s=30).split(",")[0]
    assert not address.startswith(("0.0.0.0", "127.")), address  # the node's address
    before = _selector_stats()
    fake = [pb.ReportKVRequest(replica_id="fake-replica", hello=pb.ReplicaHello(
                block_size=16, num_blocks=64)),
            pb.ReportKVRequest(replica_id="fake-replica", resync=pb.KVResync(
                seq=1, block_hashes=list(range(1, 33)), done=True))]
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.CacheSelectionStub(ch)
        for md in ((), (("authorization", "Bearer not-the-token"),)):
            for call, arg in ((stub.Stats, pb.StatsRequest()), (stub.ReportKV, iter(fake)),
                              (stub.Select, pb.SelectRequest(block_hashes=[1, 2]))):
                with pytest.raises(grpc.RpcError) as info:
                    call(arg, timeout=10, metadata=md)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = _selector_stats()
    assert {r["replica_id"] for r in after["replicas"]} == {
        r["replica_id"] for r in before["replicas"]}
    assert after["num_unique_blocks"] == before["num_unique_blocks"]
    # The app's own router and replicas hold the token: routing is still cache-aware.
    _chat(cluster, "Question one?", system=_prefix("hotel"))
    assert _chat(cluster, "Again?", system=_prefix("hotel")).usage.prompt_tokens_details\
        .cached_tokens >= 8 * 16


# -- monitoring ---------------------------------------------------------------------------------
def test_dashboard_lists_the_app_running(cluster: Cluster) -> None:
    from ray._private.authentication.http_token_authentication import (
        get_auth_headers_if_auth_enabled,
    )

    # NOTE: Ray clusters enable token auth by default; send the token as Ray's CLI does.
    r = requests.get(f"{cluster.dashboard}/api/serve/applications/", timeout=30,
                     headers=get_auth_headers_if_auth_enabled({}))
    assert r.status_code == 200
    app = r.json()["applications"][APP]
    assert app["status"] == "RUNNING"
    assert set(app["deployments"]) == {"OpenAIIngress", "LLMReplica", "CacheSelector"}
    assert {d["status"] for d in app["deployments"].values()} == {"HEALTHY"}


def _readme_metrics() -> set[str]:
    """The series the README's metrics table names."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text.split("<!-- metrics-table:")[1].split("<!-- end metrics-table -->")[0]
    return set(re.findall(r"^\| `(ray_tinyserve_\w+)` \|", table, re.M))


def test_metrics_port_serves_tinyserve_series_that_pass_promtool(cluster: Cluster) -> None:
    wanted = _readme_metrics()
    assert len(wanted) >= 20, wanted  # the table was found and read
    deadline = time.monotonic() + 90
    while True:
        text = requests.get(cluster.metrics, timeout=30).text
        names = set(re.findall(r"^(ray_tinyserve_\w+?)(?:_bucket)?\{", text, re.M))
        if wanted <= names or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= names, sorted(wanted - names)
    assert re.search(r'ray_tinyserve_prefix_hit_tokens_total\{[^}]*deployment="LLMReplica"', text)
    assert re.search(r'ray_tinyserve_router_decisions_total\{[^}]*policy="tinyserve"', text)
    assert re.search(r'ray_tinyserve_selector_decisions_total\{[^}]*deployment="CacheSelector"',
                     text)
    # the block states partition each replica's pool (engine num_blocks = NUM_BLOCKS)
    states: dict[str, dict[str, float]] = {}
    for labels, value in re.findall(r"^ray_tinyserve_kv_num_blocks\{([^}]*)\} (\S+)$", text,
                                    re.M):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        states.setdefault(tags["replica"], {})[tags["state"]] = float(value)
    assert len(states) == 2, states
    for replica, by_state in states.items():
        assert set(by_state) == {"empty", "evictable", "used"}, by_state
        assert sum(by_state.values()) == NUM_BLOCKS, (replica, by_state)
    # every gauge's help states its unit and range
    gauges = set(re.findall(r"^# TYPE (ray_tinyserve_\w+) gauge$", text, re.M))
    assert gauges >= {n for n in wanted if "_ratio" in n or "kv_num_blocks" in n}
    for name in gauges:
        help_line = re.search(rf"^# HELP {name} (.*)$", text, re.M)
        assert help_line and re.search(r"Unit: [^;]+; range: .+", help_line.group(1)), name
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (see Makefile setup)"
    ours = _our_families(text)
    out = subprocess.run([promtool, "check", "metrics"], input=ours, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _our_families(text: str) -> str:
    """The ray_tinyserve_* families of a scrape, minus Ray's own camelCase labels."""
    keep: list[str] = []
    label = re.compile(r'(?:,)?\b(?:' + "|".join(RAY_LABELS) + r')="[^"]*"')
    for line in text.splitlines():
        if "ray_tinyserve_" not in line:
            continue
        if not line.startswith("#"):
            line = label.sub("", line).replace("{,", "{")
        keep.append(line)
    return "\n".join(keep) + "\n"


# -- faults (last: they disturb the app) --------------------------------------------------------
def test_selector_outage_falls_back_then_cache_aware_again(cluster: Cluster) -> None:
    (name,) = _actor_names("CacheSelector")
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    for i in range(4):  # served by the power-of-two fallback meanwhile
        assert _chat(cluster, f"During the outage {i}?").choices[0].message.content
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            st = _selector_stats()
            if st["num_replicas"] == 2 and all(r["synced"] for r in st["replicas"]):
                break
        except Exception:
            pass
        time.sleep(1)
    else:
        pytest.fail("selection service did not come back with both replicas")
    # The router re-resolves the restarted service's address after a few failed Selects.
    deadline = time.monotonic() + 60
    while _selector_stats()["decisions"].get("tinyserve", 0) == 0:
        assert time.monotonic() < deadline, "router never used the restarted service"
        _chat(cluster, "ping?", max_tokens=1)
    for tag in ("echo", "foxtrot", "golf"):
        _chat(cluster, "Question one?", system=_prefix(tag))
        second = _chat(cluster, "Another question?", system=_prefix(tag))
        assert second.usage.prompt_tokens_details.cached_tokens >= 8 * 16, tag


def test_killing_a_replica_loses_no_request_that_had_not_streamed(cluster: Cluster) -> None:
    results: list[Any] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results.append(_chat(cluster, f"Fact {i} {uuid.uuid4().hex[:6]}?", max_tokens=24,
                                 extra_body={"ignore_eos": True}))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # Kill a replica while it holds admitted requests (some of them not yet scheduled).
    deadline = time.monotonic() + 30
    busy: list[str] = []
    while not busy and time.monotonic() < deadline:
        busy = [rid for rid, st in _replica_stats(6).items() if st["num_inflight"] >= 2]
    assert busy, "no replica ever held two requests"
    (victim,) = [n for n in _actor_names("LLMReplica") if n.endswith(f"#{busy[0]}")]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert len(results) == 6
    assert all(r.usage.completion_tokens == 24 for r in results)
    for i in range(3):
        assert _chat(cluster, f"After the crash {i}?").choices[0].message.content
