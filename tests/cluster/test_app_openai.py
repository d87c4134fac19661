"""OpenAI protocol and wire format without Ray: parsing, sampling mapping, bodies, chunks."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cluster.serve.app_config import AppConfig
from cluster.serve.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from cluster.serve.openai_responses import Accumulated, ResponseContext, sse, usage
from replicas.outputs import RequestMetrics, RequestOutput


def _out(text: str, ids: list[int], finished: bool = False, n_out: int = 1,
         logprobs: list[dict[int, float]] | None = None) -> RequestOutput:
    return RequestOutput("r", ids, text, finished, "stop" if finished else None, 40, 32, n_out,
                         logprobs, RequestMetrics(0.0, 0.1, 0.01))


def test_chat_request_maps_onto_sampling_params() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 9, "max_tokens": 99, "temperature": 0, "top_p": 0.5,
        "stop": "END", "seed": 3, "logprobs": True, "top_logprobs": 2, "top_k": 5,
        "unknown_field": 1,
    })
    req.check_supported()
    p = req.sampling_params(default_max_tokens=256)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.logprobs, p.top_k) == (
        9, 0.0, 0.5, ["END"], 3, 2, 5
    )
    assert req.chat() == [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hi"}]
    bare = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "x"}]})
    assert bare.sampling_params(default_max_tokens=77).max_tokens == 77
    assert bare.sampling_params(default_max_tokens=77).logprobs is None


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_unsupported_chat_fields_are_refused_by_name(body: dict, param: str) -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    with pytest.raises(OpenAIError) as info:
        req.check_supported()
    assert info.value.param == param and info.value.status_code == 400


def test_invalid_values_fail_validation() -> None:
    for bad in ({"temperature": 3}, {"max_tokens": 0}, {"messages": []},
                {"messages": [{"role": "robot", "content": "x"}]}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(
                {"model": "m", "messages": [{"role": "user", "content": "x"}], **bad})


def test_completion_prompt_forms() -> None:
    def prompt(p: object) -> object:
        return CompletionRequest.model_validate({"model": "m", "prompt": p}).single_prompt()

    assert prompt("abc") == "abc"
    assert prompt([5, 6]) == [5, 6]
    assert prompt(["abc"]) == "abc"
    assert prompt([[5, 6]]) == [5, 6]
    with pytest.raises(OpenAIError, match="one prompt"):
        prompt(["a", "b"])
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert req.sampling_params(default_max_tokens=500).max_tokens == 16  # OpenAI's default
    with pytest.raises(OpenAIError, match="echo"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True}).check_supported()


def test_error_body_is_openai_shaped() -> None:
    err = OpenAIError("nope", 404, param="model", code="model_not_found")
    assert err.body() == {"error": {"message": "nope", "type": "invalid_request_error",
                                    "param": "model", "code": "model_not_found"}}


def test_chat_body_carries_cached_tokens_and_logprobs() -> None:
    acc = Accumulated()
    acc.add(_out("Hel", [7], logprobs=[{7: -0.1, 8: -2.0}]))
    acc.add(_out("lo", [9], finished=True, n_out=2, logprobs=[{9: -0.3, 7: -1.0}]))
    ctx = ResponseContext("chat", "chatcmpl-1", "m", None, logprobs=1)
    body = ctx.body(acc)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == usage(40, 2, 32)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == [-0.1, -0.3]
    assert [len(c["top_logprobs"]) for c in content] == [1, 1]


def test_completion_logprobs_offsets_and_stream_chunks() -> None:
    acc = Accumulated()
    acc.add(_out("ab", [1], logprobs=[{1: -0.5}]))
    acc.add(_out("c", [2], finished=True, n_out=2, logprobs=[{2: -0.25}]))
    ctx = ResponseContext("completion", "cmpl-1", "m", None, logprobs=0)
    lp = ctx.body(acc)["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-0.5, -0.25]
    assert lp["text_offset"] == [0, 1]  # no tokenizer: token text is the id
    chat = ResponseContext("chat", "c", "m", None, logprobs=None)
    first = chat.chunk("", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = chat.chunk("x", finish_reason="length")
    assert last["object"] == "chat.completion.chunk"
    assert last["choices"][0]["finish_reason"] == "length"
    assert chat.usage_chunk(acc)["choices"] == []
    line = sse(last)
    assert line.startswith("data: ") and line.endswith("\n\n")
    assert json.loads(line[6:]) == last
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_app_config_model_name_and_refuses_unknown_keys() -> None:
    assert AppConfig().model_name() == "smollm2-135m-instruct"
    assert AppConfig(engine={"model": "/m/Llama-3/"}).model_name() == "Llama-3"
    assert AppConfig(served_model_name="x").model_name() == "x"
    with pytest.raises(ValidationError):
        AppConfig(num_replica=2)
    with pytest.raises(ValidationError):
        AppConfig(engine={"num_block": 2})


def test_routing_policy_is_checked_against_the_policy_registry() -> None:
    from cluster.serve.openai_parse import checked_policy

    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}],
         "routing_policy": "dynamo_cost"}
    )
    assert checked_policy(body.routing_policy) == "dynamo_cost"
    assert checked_policy(None) == ""
    with pytest.raises(OpenAIError) as exc:
        checked_policy("fastest_please")
    assert exc.value.body()["error"]["param"] == "routing_policy"


def test_num_prompt_chars_counts_every_accepted_prompt_shape() -> None:
    # NOTE: the ingress tokenizes a prompt inline when this is <= ingress_inline_tokenize_chars.
    def comp(prompt: object) -> int:
        return CompletionRequest.model_validate({"model": "m", "prompt": prompt}).num_prompt_chars()

    assert comp("hello") == 5
    assert comp([1, 2, 3]) == 3 and comp([[1, 2]]) == 2 and comp(["ab", "cde"]) == 5
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text",
                                                                        "text": "!"}]},
        {"role": "assistant", "content": None}]})
    assert chat.num_prompt_chars() == 9
