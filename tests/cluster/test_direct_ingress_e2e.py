"""Serve's direct ingress end to end on a real local Ray cluster (one node, no HAProxy): the
app of ``build_app`` (SmolLM2 on CPU, one replica, the selection service, TinyServeRouter)
with ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, the ``openai`` client against the ingress
replica's own port (``cluster.serve.direct_ingress``) and against the proxy's.

Also the ingress's inline tokenization (``ingress_inline_tokenize_chars``): a short prompt
is encoded on the event loop, a long one on a tokenizer thread, both to the ids ``/tokenize``
gives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from serve_env import serve_with_env

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

APP = "direct"
MODEL = "smollm2-135m-instruct"
KEY = "sk-e2e-" + uuid.uuid4().hex
INLINE_MAX_CHARS = 200
# NOTE: the environment of the Ray cluster this module starts (Serve reads it in the
# controller and the replicas); no drain wait on shutdown, so the module ends in seconds.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}
SHORT = "The capital of France is"
LONG = "Here is a list of rules. " + " ".join(f"Rule {i}: be precise." for i in range(20))


@dataclass
class Direct:
    proxy: str
    direct: str

    def client(self, base: str, key: str = KEY) -> Any:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Direct]:
    from cluster.serve.app import build_app
    from cluster.serve.direct_ingress import direct_urls

    key_file = tmp_path_factory.mktemp("auth") / "api_keys"
    key_file.write_text(f"{KEY}\n")
    with serve_with_env(SERVE_ENV) as proxy:
        args = {
            "engine": {"num_blocks": 128, "max_num_seqs": 4, "num_threads": 1},
            "num_replicas": 1,
            "selector": {"port": 0, "num_replicas": 1},
            "router_kwargs": {"select_timeout_s": 1.0},
            "auth": {"api_keys_file": str(key_file)},
            "ingress_inline_tokenize_chars": INLINE_MAX_CHARS,
            # NOTE: the size threshold alone (an idle ingress inlines long prompts too:
            # test_app_e2e.py and test_tokenizer_pool.py cover that)
            "ingress_idle_inline_tokenize_chars": 0,
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield Direct(proxy, direct_urls(APP, proxy)[0])


def _traces() -> dict[str, dict[str, Any]]:
    ingress = serve.get_deployment_handle("OpenAIIngress", APP)
    return {t["response_id"]: t for t in ingress.traces.remote().result(timeout_s=30)}


def test_the_ingress_replica_serves_the_api_on_its_own_port_with_the_key(app: Direct) -> None:
    port = int(app.direct.rsplit(":", 1)[1])
    assert app.direct.startswith("http://127.0.0.1:") and port != int(app.proxy.rsplit(":")[-1])
    assert 30000 <= port <= 31000  # Serve's default direct-ingress range
    # NOTE: the API key check is the app's own middleware: the direct port keeps it.
    with pytest.raises(openai.AuthenticationError):
        app.client(app.direct, key="sk-wrong").models.list()
    assert requests.get(f"{app.direct}/health", timeout=30).status_code == 200

    client = app.client(app.direct)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 4
    chunks = list(client.completions.create(
        model=MODEL, prompt=SHORT, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 5
    traces = _traces()
    assert chunks[0].id in traces and chat.id in traces  # served by this app's ingress


def test_the_cli_prints_the_direct_url(app: Direct) -> None:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-m", "cluster.serve.direct_ingress", APP], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert app.direct in out.split()


def test_short_prompts_inline_long_on_threads_same_ids_and_answers_on_either_port(
    app: Direct,
) -> None:
    assert len(SHORT) <= INLINE_MAX_CHARS < len(LONG)
    _traces()  # forget earlier requests
    direct, proxy = app.client(app.direct), app.client(app.proxy)
    for prompt, inline in ((SHORT, True), (LONG, False)):
        ids = requests.post(f"{app.direct}/tokenize", json={"prompt": prompt},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=30
                            ).json()["tokens"]
        answers = [c.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                        temperature=0, extra_body={"ignore_eos": True})
                   for c in (direct, proxy)]
        assert answers[0].choices[0].text == answers[1].choices[0].text  # greedy, same ids
        assert [a.usage.prompt_tokens for a in answers] == [len(ids), len(ids)]
        traces = _traces()
        assert [traces[a.id]["tokenized_inline"] for a in answers] == [inline, inline]
    chat = direct.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": LONG}], max_tokens=2, temperature=0)
    assert _traces()[chat.id]["tokenized_inline"] is False
