"""The OpenAI API surface end to end (issue 18) on a real local Ray cluster: the Serve app
from ``build_app`` (SmolLM2 on CPU, 2 replicas), real HTTP through the ``openai`` client:
n > 1 on shared blocks, structured output, the vLLM knobs, the extra routes, 404/405; a
schemathesis fuzz of every route from the app's own /openapi.json (issue 17). The selection
service serves TLS here (a CA made in the test): routing and KV reports go over it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from ports import free_port

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

APP = "tinyserve-api"
TLS_NAME = "selector.tinyserve.test"
FUZZ_GENERATE = 15  # positive examples per generating route (each runs the model)
FUZZ_OTHER = 25  # examples per other route and mode (validation, no model run)
MODEL = "smollm2-135m-instruct"
BLOCK = 16
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer"},
        "coastal": {"type": "boolean"},
    },
    "required": ["city", "population", "coastal"],
    "additionalProperties": False,
}


@dataclass
class App:
    http: str
    client: Any


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    from tls_certs import make_pki

    from cluster.serve.app import build_app

    # NOTE: the selection replicas bind the node's address; the certificate names one DNS
    # name and the clients are told to expect it (selector.tls.server_name).
    pki = make_pki(tmp_path_factory.mktemp("pki"), dns_names=(TLS_NAME,), ips=())
    tls = {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file),
           "ca_file": str(pki.ca_file), "server_name": TLS_NAME}

    port = free_port()
    ray.init(address="local", num_cpus=6, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "engine": {"num_blocks": 256, "max_num_seqs": 8, "num_threads": 1},
            "num_replicas": 2,
            "num_cpus_per_replica": 1,
            "router_kwargs": {"select_timeout_s": 1.0},
            "selector": {"port": 0, "stale_after_s": 600, "tls": tls},
            "auth": {"enabled": False},  # NOTE: loopback only (serve.start above)
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        yield App(base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                      timeout=180))
    finally:
        serve.shutdown()
        ray.shutdown()


def _pool_counters() -> dict[str, tuple[int, int]]:
    """(prefix query tokens, prefix hit tokens) of every replica's pool."""
    handle = serve.get_deployment_handle("LLMReplica", APP)
    seen: dict[str, tuple[int, int]] = {}
    for _ in range(12):
        st = handle.stats.remote().result(timeout_s=30)
        seen[st["replica_id"]] = (st["prefix_query_tokens"], st["prefix_hit_tokens"])
    return seen


def _delta(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
           ) -> tuple[int, int]:
    q = sum(after[r][0] - before.get(r, (0, 0))[0] for r in after)
    h = sum(after[r][1] - before.get(r, (0, 0))[1] for r in after)
    return q, h


def test_n4_one_prefill_seeded_choices_and_prompt_counted_once(app: App) -> None:
    content = f"[{uuid.uuid4().hex}] Name a colour and say why you like it, in a few words."
    messages = [{"role": "user", "content": content}]
    before = _pool_counters()
    resp = app.client.chat.completions.create(model=MODEL, messages=messages, n=4, seed=11,
                                              temperature=1.0, max_tokens=8,
                                              extra_body={"ignore_eos": True})
    q, h = _delta(before, _pool_counters())
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    prompt = resp.usage.prompt_tokens
    assert q == 4 * prompt  # the pools saw 4 sequences of the prompt...
    assert h == 3 * (prompt // BLOCK) * BLOCK  # ...and computed its full blocks once
    assert resp.usage.completion_tokens == 4 * 8
    texts = [c.message.content for c in resp.choices]
    assert len(set(texts)) > 1
    # Choice i is the single request seeded with seed + i, wherever it ran.
    single = app.client.chat.completions.create(model=MODEL, messages=messages, seed=13,
                                                temperature=1.0, max_tokens=8,
                                                extra_body={"ignore_eos": True})
    assert single.choices[0].message.content == texts[2]

    chunks = list(app.client.completions.create(
        model=MODEL, prompt=f"[{uuid.uuid4().hex}] Once upon a time", n=2, max_tokens=6,
        temperature=1.0, seed=3, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    order = [c.choices[0].index for c in chunks if c.choices]
    assert set(order) == {0, 1}
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    assert chunks[-1].usage.completion_tokens == 12


def test_structured_output_validates_streamed_or_not_beside_free_requests(app: App) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    messages = [{"role": "user", "content": "Describe Lisbon as JSON."}]

    def constrained(stream: bool, temperature: float) -> str:
        if not stream:
            r = app.client.chat.completions.create(
                model=MODEL, messages=messages, response_format=fmt, max_tokens=100,
                temperature=temperature, seed=1)
            assert r.choices[0].finish_reason == "stop"
            return r.choices[0].message.content or ""
        chunks = app.client.chat.completions.create(
            model=MODEL, messages=messages, response_format=fmt, max_tokens=100,
            temperature=temperature, seed=1, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def json_object() -> str:
        r = app.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content":
                                    "Give me a JSON object describing a cat with name and age."}],
            response_format={"type": "json_object"}, max_tokens=100, temperature=0)
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content or ""

    def free() -> str:
        r = app.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi to the sea."}],
            max_tokens=12, temperature=0)
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(constrained, s, t) for s in (False, True) for t in (0.0, 0.9)]
        obj, plain = pool.submit(json_object), pool.submit(free)
        answers = [f.result() for f in futs]
        assert isinstance(json.loads(obj.result()), dict)
        assert plain.result() and not plain.result().lstrip().startswith("{")
    for text in answers:
        jsonschema.validate(json.loads(text), CITY)

    with pytest.raises(openai.BadRequestError, match="invalid JSON schema"):
        app.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "nope"}}})


def test_vllm_knobs_and_max_completion_tokens(app: App) -> None:
    messages = [{"role": "user", "content": "Tell me about the moon."}]
    r = app.client.chat.completions.create(model=MODEL, messages=messages,
                                           max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    eos = requests.post(f"{app.http}/tokenize", timeout=30,
                        json={"prompt": "<|im_end|>", "add_special_tokens": False}).json()["tokens"]
    assert len(eos) == 1
    bias = {str(eos[0]): 100}
    ends = app.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                              temperature=0, logit_bias=bias)
    assert ends.usage.completion_tokens == 1 and ends.choices[0].finish_reason == "stop"
    held = app.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                              temperature=0, logit_bias=bias,
                                              extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"
    base = app.client.completions.create(model=MODEL, prompt="one one one one", max_tokens=12,
                                         temperature=0)
    pen = app.client.completions.create(model=MODEL, prompt="one one one one", max_tokens=12,
                                        temperature=0, extra_body={"repetition_penalty": 1.8})
    assert pen.choices[0].text != base.choices[0].text
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        app.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                           logit_bias={"999999999": 5})


def test_model_card_tokenize_detokenize_and_openai_shaped_404_405(app: App) -> None:
    card = app.client.models.retrieve(MODEL)
    assert card.id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        app.client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"
    tok = requests.post(f"{app.http}/tokenize", json={"model": MODEL, "prompt": "Hello world"},
                        timeout=30).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    text = requests.post(f"{app.http}/detokenize", json={"tokens": tok["tokens"]},
                         timeout=30).json()
    assert text == {"prompt": "Hello world"}
    limit = card.model_extra["max_model_len"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="maximum context length") as too_long:
        app.client.completions.create(model=MODEL, prompt="Hello world", max_tokens=limit)
    assert too_long.value.body["code"] == "context_length_exceeded"
    for method, path, status in (("get", "/v1/nope", 404), ("post", "/v1/models", 405),
                                 ("get", "/v1/chat/completions", 405), ("get", "/tokenize", 405)):
        r = requests.request(method, f"{app.http}{path}", timeout=30)
        assert r.status_code == status, (method, path)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and path in err["message"]


# -- the selection service over TLS ---------------------------------------------------------------
def test_selection_service_serves_tls_to_the_app_and_refuses_plaintext(app: App) -> None:
    import grpc

    from protos import cache_selection_pb2 as pb
    from protos import cache_selection_pb2_grpc as pb_grpc

    handle = serve.get_deployment_handle("CacheSelector", APP)
    for i in range(4):  # routed by the service: the router's Selects go over TLS
        app.client.completions.create(model=MODEL, prompt=f"TLS check {i}:", max_tokens=2)
    # NOTE: two selection replicas; a handle call reaches either: look at both.
    stats = [handle.stats.remote().result(timeout_s=30) for _ in range(12)]
    assert max(sum(st["decisions"].values()) for st in stats) >= 3, stats
    for st in stats:  # every LLM replica reports its KV over TLS to every selection replica
        assert len(st["replicas"]) == 2 and all(r["synced"] for r in st["replicas"]), st
    address = handle.address.remote().result(timeout_s=30).split(",")[0]
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as info:
        pb_grpc.CacheSelectionStub(ch).Ping(pb.PingRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# -- fuzz: schemathesis from the published schema -------------------------------------------------
def _bounded(case: Any) -> None:
    """Keep generation short on CPU: at most 4 new tokens (and min_tokens within them); a
    body that sets no limit gets one (the server's default is 256 tokens)."""
    body = case.body
    if isinstance(body, dict):
        if case.path.startswith("/v1/"):
            body.setdefault("max_tokens", 4)
        for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 4:
                body[key] = 4


def test_schemathesis_fuzz_of_every_route_gives_no_server_error(app: App) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    raw = requests.get(f"{app.http}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        generates = op.path.startswith("/v1/") and op.method.upper() == "POST"
        spec = raw["paths"][op.path][op.method.lower()]
        negatable = "requestBody" in spec or bool(spec.get("parameters"))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 1 + negatable]:
            # NOTE: bounded for the ~1 minute budget: a generating example costs ~0.3 s of CPU.
            n = (FUZZ_GENERATE if generates else FUZZ_OTHER) if mode.is_positive else FUZZ_OTHER

            @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                _bounded(case)
                response = case.call(base_url=app.http, timeout=120)
                counts[f"{response.status_code}"] = counts.get(f"{response.status_code}", 0) + 1
                case.validate_response(response, checks=checks)

            try:
                run()
            except Unsatisfiable:
                # NOTE: e.g. a free-form path parameter: no request violates the schema
                assert not mode.is_positive, op.label
    assert not [c for c in counts if c.startswith("5")], counts
    assert counts.get("200", 0) > 0 and counts.get("400", 0) > 0, counts
    # the app still serves afterwards
    out = app.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Still there?"}], max_tokens=2)
    assert out.choices[0].message.content is not None
    assert requests.get(f"{app.http}/health", timeout=30).status_code == 200
