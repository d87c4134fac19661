"""The published OpenAPI schema without Ray: every served route is in it with its real request
body and answers, and its JSON schemas accept what the routes accept and refuse what they
refuse (checked with jsonschema against the same pydantic models the routes validate with)."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("ray.serve")  # the ingress module builds a Serve deployment
jsonschema = pytest.importorskip("jsonschema")

from cluster.serve.openai_ingress import api  # noqa: E402
from cluster.serve.openai_protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from cluster.serve.openai_schema import ROUTES, build_openapi  # noqa: E402


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(json.dumps(build_openapi(api)))  # NOTE: what /openapi.json serves


def _validator(schema: dict[str, Any], name: str) -> Any:
    root = {"$ref": f"#/components/schemas/{name}", "components": schema["components"]}
    return jsonschema.Draft202012Validator(root)


def test_every_route_has_its_body_answers_and_security(schema: dict[str, Any]) -> None:
    served = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert set(ROUTES) <= served
    assert schema["openapi"].startswith("3.")
    for (method, path), route in ROUTES.items():
        op = schema["paths"][path][method]
        ok = op["responses"]["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith("/" + route.answer.__name__)
        assert ("text/event-stream" in ok) == route.streams
        for code in route.errors:
            assert op["responses"][str(code)]["content"]["application/json"]["schema"][
                "$ref"].endswith("/ErrorResponse")
        if route.body is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/" + route.body.__name__) and op["requestBody"]["required"]
        assert op["security"] == ([] if path == "/health" else [{"bearer": []}])
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    unresolved = [r for r in json.dumps(schema).split('"$ref": "')[1:]
                  if r.split('"')[0].rsplit("/", 1)[-1] not in schema["components"]["schemas"]]
    assert not unresolved


@pytest.mark.parametrize(("model", "good", "bad"), [
    (ChatCompletionRequest,
     {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
      "stop": ["a"], "response_format": {"type": "json_object"}},
     [{"model": "m", "messages": []}, {"model": "m", "messages": [{"role": "robot"}]},
      {"model": "m", "messages": [{"role": "user"}], "temperature": 3},
      {"messages": [{"role": "user", "content": "x"}]}]),
    (CompletionRequest,
     {"model": "m", "prompt": [1, 2, 3], "n": 2, "logprobs": 1},
     [{"model": "m", "prompt": 5}, {"model": "m", "prompt": "x", "n": 99},
      {"model": "m", "prompt": "x", "logprobs": 9}]),
])
def test_request_schemas_agree_with_the_route_models(
    schema: dict[str, Any], model: Any, good: dict[str, Any], bad: list[dict[str, Any]]
) -> None:
    v = _validator(schema, model.__name__)
    v.validate(good)
    model.model_validate(good)
    for body in bad:
        assert not v.is_valid(body), body
        with pytest.raises(ValueError):
            model.model_validate(body)


def test_served_model_name_narrows_the_request_bodies() -> None:
    named = json.loads(json.dumps(build_openapi(api, "tiny-model")))
    chat = _validator(named, "ChatCompletionRequest")
    body = {"model": "tiny-model", "messages": [{"role": "user", "content": "hi"}]}
    assert chat.is_valid(body) and not chat.is_valid({**body, "model": "other"})
    tok = _validator(named, "TokenizeRequest")
    assert tok.is_valid({"prompt": "x"}) and tok.is_valid({"model": "tiny-model", "prompt": "x"})
    assert not tok.is_valid({"model": "other", "prompt": "x"})
