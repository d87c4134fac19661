"""The pieces the fault runs and the soak rest on, without Ray: the outcome classifier of
``benchmarks.mixed_load`` against a real aiohttp server on loopback that answers each way a
stream can end, the soak's RSS slope, and the app's placement resources."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from benchmarks.mixed_load import Mix, MixedLoad, Outcome, count  # noqa: E402
from benchmarks.soak import memory_slopes  # noqa: E402

CHUNK = {"choices": [{"index": 0, "text": "x", "finish_reason": None}]}
LAST = {"choices": [{"index": 0, "text": "y", "finish_reason": "length"}]}
ERROR = {"error": {"message": "replica failed", "type": "server_error", "code": None}}


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def _stream(request: web.Request, events: list[Any], drop: bool = False) -> Any:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for ev in events:
        await resp.write(_sse(ev))
    if drop:  # the server process dies: the connection closes without a proper end
        assert request.transport is not None
        request.transport.close()
        return resp
    await resp.write_eof()
    return resp


SCENARIOS: dict[str, Callable[[web.Request], Awaitable[Any]]] = {
    "ok": lambda r: _stream(r, [CHUNK, LAST, "[DONE]"]),
    "cut_clean": lambda r: _stream(r, [CHUNK, ERROR, "[DONE]"]),
    "cut_no_done": lambda r: _stream(r, [CHUNK, ERROR]),
    "cut_drop": lambda r: _stream(r, [CHUNK, CHUNK], drop=True),
    "error_first": lambda r: _stream(r, [ERROR, "[DONE]"]),
    "no_finish": lambda r: _stream(r, [CHUNK, "[DONE]"]),
    "http_503": lambda r: asyncio.sleep(0, web.json_response(ERROR, status=503)),
    "http_400": lambda r: asyncio.sleep(0, web.json_response(
        {"error": {"message": "bad", "type": "invalid_request_error"}}, status=400)),
    "plain_ok": lambda r: asyncio.sleep(0, web.json_response(
        {"choices": [{"text": "x"}], "usage": {"prompt_tokens_details": {"cached_tokens": 32}}})),
    "long": lambda r: _stream(r, [CHUNK] * 5 + [LAST, "[DONE]"]),
}
EXPECTED = [  # (scenario, stream, intent, cancel_after) -> status
    ("ok", True, "good", 0, "ok"),
    ("cut_clean", True, "good", 0, "cut_clean"),
    ("cut_no_done", True, "good", 0, "cut_dirty"),
    ("cut_drop", True, "good", 0, "cut_dirty"),
    ("error_first", True, "good", 0, "lost"),
    ("no_finish", True, "good", 0, "cut_dirty"),
    ("http_503", True, "good", 0, "lost"),
    ("http_503", False, "good", 0, "lost"),
    ("http_400", False, "good", 0, "wrong"),
    ("http_400", False, "bad", 0, "rejected"),
    ("http_503", False, "bad", 0, "wrong"),
    ("plain_ok", False, "bad", 0, "wrong"),
    ("plain_ok", False, "good", 0, "ok"),
    ("long", True, "cancel", 2, "cancelled"),
    ("refused", False, "good", 0, "lost"),
]


def test_every_way_a_request_can_end_is_classified() -> None:
    async def main() -> list[tuple[str, Outcome]]:
        app = web.Application()
        for name, handler in SCENARIOS.items():
            app.router.add_post(f"/{name}/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        results = []
        try:
            async with aiohttp.ClientSession() as session:
                for i, (name, stream, intent, cancel_after, _) in enumerate(EXPECTED):
                    host = f"http://127.0.0.1:{port if name != 'refused' else 1}/{name}"
                    load = MixedLoad(host, "m")
                    out = Outcome(i, "completion", stream, intent)
                    await load.request(session, {"stream": stream}, "completion", out,
                                       cancel_after)
                    results.append((name, out))
        finally:
            await runner.cleanup()
        return results

    results = asyncio.run(main())
    got = [(name, o.stream, o.intent, o.status) for name, o in results]
    assert got == [(n, s, i, st) for n, s, i, _, st in EXPECTED]
    by_name = {name: o for name, o in results}
    assert by_name["plain_ok"].num_cached_tokens == 32
    assert by_name["long"].num_chunks == 2 and by_name["cut_drop"].num_chunks == 2
    assert count([o for _, o in results])["cut_dirty"] == 3


def test_planned_requests_follow_the_mix() -> None:
    load = MixedLoad("http://x", "m", mix=Mix(p_stream=1.0, p_cancel=1.0, p_bad=0.0), seed=3)
    plans = [load._plan() for _ in range(50)]
    assert all(out.intent == "cancel" and 1 <= after <= 3 and body["stream"]
               for out, _, body, after in plans)  # fmt: skip
    load = MixedLoad("http://x", "m", mix=Mix(p_stream=0.0, p_bad=1.0), seed=3)
    plans = [load._plan() for _ in range(50)]
    assert all(out.intent == "bad" for out, *_ in plans)
    # shared prefixes: the same tag gives the same system prompt
    good = MixedLoad("http://x", "m", mix=Mix(p_chat=1.0, p_bad=0.0, num_prefixes=2), seed=1)
    systems = {out.tag: body["messages"][0]["content"]
               for out, _, body, _ in (good._plan() for _ in range(20))}  # fmt: skip
    assert set(systems) == {"t0", "t1"} and systems["t0"] != systems["t1"]


def test_memory_slope_is_fitted_after_the_warmup() -> None:
    mb = 1024 * 1024
    samples = [{"t_s": t, "rss": {"A": (500 + (100 if t < 60 else 0) + t / 36) * mb,
                                  "B": 300 * mb}} for t in range(0, 3600, 30)]  # fmt: skip
    slopes = memory_slopes(samples, warmup_s=60)
    assert slopes["A"]["slope_mb_per_hour"] == pytest.approx(100.0, rel=1e-6)
    assert slopes["B"]["slope_mb_per_hour"] == pytest.approx(0.0, abs=1e-9)
    assert slopes["A"]["num_samples"] == len(range(60, 3600, 30))
    assert memory_slopes(samples[:3], warmup_s=60) == {}


def test_placement_resources_reach_each_deployment() -> None:
    from pydantic import ValidationError

    from cluster.serve.app import build_app
    from cluster.serve.app_config import AppConfig

    app = build_app({"placement": {"ingress": {"ingress": 1}, "llm": {"llm": 1},
                                   "selector": {"selector": 0.5}}})  # fmt: skip
    ingress = app._bound_deployment
    assert ingress.ray_actor_options["resources"] == {"ingress": 1}
    llm = ingress.init_args[0]._bound_deployment  # the LLMReplica application
    assert llm.ray_actor_options["resources"] == {"llm": 1}
    selector = llm.init_args[1]._bound_deployment
    assert selector.ray_actor_options["resources"] == {"selector": 0.5}
    assert "resources" not in build_app({})._bound_deployment.ray_actor_options
    for bad in ({"llm": {"GPU": 1}}, {"llm": {"x": 0}}, {"gpu_nodes": {"x": 1}}):
        with pytest.raises(ValidationError):
            AppConfig(placement=bad)
