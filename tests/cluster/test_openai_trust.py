"""API keys and input limits without Ray: key loading and checking, every limit's refusal."""

from __future__ import annotations

import pytest

from cluster.serve.app_config import AppConfig
from cluster.serve.openai_auth import (
    ApiKeys,
    AuthSettings,
    check_local_only,
    is_loopback,
    load_keys,
    parse_keys,
)
from cluster.serve.openai_limits import (
    LimitSettings,
    check_body_size,
    check_params,
    check_prompt_chars,
    check_raw,
    check_token_ids,
    max_token_chars,
)
from cluster.serve.openai_protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

KEY = "sk-test-0123456789abcdef"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_keys_from_env_and_file_and_bearer_check(tmp_path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# operator keys\n{KEY}\nsk-second-key-abcdef0123 # ci\n")
    keys = load_keys(AuthSettings(api_keys_file=str(f)), environ={"TINYSERVE_API_KEYS":
                                                                  "sk-env-key-0123456789,"})
    assert keys is not None and len(keys.digests) == 3
    assert keys.check(f"Bearer {KEY}") and keys.check("bearer sk-env-key-0123456789")
    assert keys.check("Bearer sk-second-key-abcdef0123")
    for bad in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer ", "Bearer \ud800"):
        assert not keys.check(bad), bad
    assert parse_keys("a, b\n c # d\n#e") == ["a", "b", "c"]


def test_auth_fails_closed_and_off_means_loopback_only(tmp_path) -> None:
    with pytest.raises(ValueError, match="no API key"):
        load_keys(AuthSettings(), environ={})
    missing = AuthSettings(api_keys_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="does not exist"):
        load_keys(missing, environ={})
    assert load_keys(missing, environ={"TINYSERVE_API_KEYS": KEY}) is not None
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="unreadable"):
        load_keys(AuthSettings(api_keys_file=str(tmp_path / "dir")), environ={})
    with pytest.raises(ValueError, match="at least 16"):
        ApiKeys.from_keys(["short"])
    off = AuthSettings(enabled=False)
    assert load_keys(off, environ={}) is None
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert is_loopback(host)
        check_local_only(off, host)
    for host in ("0.0.0.0", "10.0.0.5", "::", "", None):
        with pytest.raises(ValueError, match="loopback"):
            check_local_only(off, host)
        check_local_only(AuthSettings(), host)  # auth on: any address
    assert AppConfig().auth.enabled and AppConfig().limits.max_stop == 16


def _refused(fn, *args, status: int = 400) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        fn(*args)
    assert info.value.status_code == status
    return info.value


def test_raw_checks_name_the_field() -> None:
    lim = LimitSettings(max_messages=2)
    chat_fields = ChatCompletionRequest.model_fields
    for field in ("tool_choice", "functions", "tools", "parallel_tool_calls"):
        err = _refused(check_raw, {**CHAT, field: [{"x": 1}]}, chat_fields, lim)
        assert err.param == field and "not supported" in err.message
    err = _refused(check_raw, {**CHAT, "max_token": 3}, chat_fields, lim)
    assert err.param == "max_token" and "Unrecognized" in err.message
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]
    err = _refused(check_raw, {**CHAT, "messages": msgs}, chat_fields, lim)
    assert err.param == "messages[0].tool_calls"
    err = _refused(check_raw, {**CHAT, "messages": [CHAT["messages"][0]] * 3}, chat_fields, lim)
    assert err.param == "messages"
    err = _refused(check_raw, {**CHAT, "messages": [{"role": "user", "content": "\ud800"}]},
                   chat_fields, lim)
    assert "surrogate" in err.message
    _refused(check_raw, {"model": "m", "prompt": "a\udfffb"}, CompletionRequest.model_fields, lim)
    # Accepted: known fields, and null/empty values of fields that ask for nothing.
    echoed = {"role": "assistant", "content": "x", "tool_calls": None, "refusal": None}
    check_raw({**CHAT, "messages": [echoed], "tools": [], "tool_choice": None, "seed": 1},
              chat_fields, lim)


def test_param_limits() -> None:
    lim = LimitSettings(max_stop=2, max_stop_chars=4, max_stop_token_ids=2,
                        max_session_id_chars=8)
    assert _refused(check_params, ["a", "b", "c"], [], None, 100, lim).param == "stop"
    assert _refused(check_params, "abcde", [], None, 100, lim).param == "stop"
    assert _refused(check_params, None, [1, 2, 3], None, 100, lim).param == "stop_token_ids"
    assert _refused(check_params, None, [-1], None, 100, lim).param == "stop_token_ids"
    assert _refused(check_params, None, [100], None, 100, lim).param == "stop_token_ids"
    assert _refused(check_params, None, [], "s" * 9, 100, lim).param == "session_id"
    check_params(["ab", "cd"], [0, 99], "s" * 8, 100, lim)
    assert _refused(check_token_ids, [3, -1], 100, "prompt").param == "prompt"
    _refused(check_body_size, "2048", LimitSettings(max_body_bytes=1024), status=413)
    check_body_size("1024", LimitSettings(max_body_bytes=1024))
    check_body_size("junk", LimitSettings(max_body_bytes=1024))


def test_prompt_char_bound_never_refuses_what_would_fit() -> None:
    from replicas.model_loader import load_tokenizer
    from replicas.model_source import resolve_model_dir

    tok = load_tokenizer(resolve_model_dir("default"))
    longest = max_token_chars(tok)
    lim = LimitSettings(max_prompt_tokens=64)
    for text in (" " * 5000, "abc" * 900, "\u4e2d" * 700, "x" * 3000 + "\n" * 200):
        num_tokens = len(tok.encode(text, add_special_tokens=False))
        if num_tokens <= lim.max_prompt_tokens:
            check_prompt_chars(len(text), longest, lim)  # must not refuse a prompt that fits
    # A text far over the limit is refused without tokenizing it.
    _refused(check_prompt_chars, 64 * longest + 1, longest, lim)


class _FailingGen:
    """A replica stream that yields ``num_ok`` outputs, then fails as a broken engine step."""

    def __init__(self, num_ok: int) -> None:
        self.num_ok = num_ok
        self.cancelled = False

    def __aiter__(self) -> _FailingGen:
        return self

    async def __anext__(self) -> object:
        from replicas.outputs import RequestMetrics, RequestOutput

        if self.num_ok == 0:
            raise RuntimeError("engine step failed: boom")
        self.num_ok -= 1
        return RequestOutput("r", [7], "Hi", False, None, 4, 0, 1, None,
                             RequestMetrics(0.0, 0.1, 0.01))

    def cancel(self) -> None:
        self.cancelled = True


def test_engine_failure_mid_stream_ends_with_error_event_then_done() -> None:
    import asyncio
    import json
    from types import SimpleNamespace

    from cluster.serve.openai_ingress import OpenAIIngress
    from cluster.serve.openai_responses import ResponseContext
    from cluster.serve.openai_trace import IngressTrace, TraceLog
    from replicas.deployment import GenerateRequest
    from replicas.sampling_params import SamplingParams

    cls = OpenAIIngress.func_or_class
    gens: list[_FailingGen] = []

    def remote(req: GenerateRequest) -> _FailingGen:
        gens.append(_FailingGen(num_ok=2))
        return gens[-1]

    fake = SimpleNamespace(llm=SimpleNamespace(generate=SimpleNamespace(remote=remote)),
                           trace_log=TraceLog(), _inbox=None, num_active=0)
    fake._arrivals = lambda gen, req: cls._arrivals(fake, gen, req)
    req = GenerateRequest("chatcmpl-1", [1, 2], SamplingParams(max_tokens=8))
    ctx = ResponseContext("chat", "chatcmpl-1", "m", None, None)

    async def run() -> list[str]:
        trace = IngressTrace("chatcmpl-1", 0.0)
        outputs = cls._outputs(fake, req, False, trace)
        first = await outputs.__anext__()
        return [c async for c in cls._sse(fake, ctx, first, outputs, False, trace)]

    events = asyncio.run(run())
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert sum('"content":"Hi"' in e for e in events) == 2  # what streamed before the failure
    assert len(gens) == 1  # a stream that started is never re-sent

    async def whole() -> None:  # non-streamed: the same failure is an OpenAIError (500)
        async for _ in cls._outputs(fake, req, True, IngressTrace("chatcmpl-1", 0.0)):
            pass

    with pytest.raises(OpenAIError) as info:
        asyncio.run(whole())
    assert info.value.status_code == 500 and info.value.err_type == "server_error"
    assert fake.num_active == 0  # both requests counted out, failures included
