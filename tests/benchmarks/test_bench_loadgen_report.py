"""Load generator (against a fake streaming OpenAI client) and the report's target logic."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.loadgen import Replayer, render_blocks, summarize
from benchmarks.sim.report import aggregate, markdown, targets
from benchmarks.workloads import build_workload


class _Stream:
    def __init__(self, chunks: list[Any]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        if not self._chunks:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self._chunks.pop(0)


class FakeClient:
    """Answers every chat with 'ok <n>' and reports half the prompt words as cached."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    async def _create(self, **kw: Any) -> _Stream:
        self.calls.append(kw)
        words = sum(len(m["content"].split()) for m in kw["messages"])
        text = f"ok {len(self.calls)}"
        delta = SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=text))],
                                usage=None)
        usage = SimpleNamespace(prompt_tokens=words, completion_tokens=2,
                                prompt_tokens_details=SimpleNamespace(cached_tokens=words // 2))
        return _Stream([delta, SimpleNamespace(choices=[], usage=usage)])


def test_render_blocks_is_deterministic_and_block_sized() -> None:
    assert render_blocks((5, 6), 16) == render_blocks((5, 6), 16)
    assert len(render_blocks((5, 6), 16).split()) == 32
    assert render_blocks((5,), 16) != render_blocks((6,), 16)


def test_replay_streams_reads_cached_tokens_and_chains_turns() -> None:
    w = build_workload("multi_turn_chat", 0, num_clients=3, num_rounds=2, tokens_per_round=32,
                       output_len=16)
    client = FakeClient()
    rep = Replayer(client, "m", w, time_scale=0.0)
    records = asyncio.run(rep.run())
    assert len(records) == len(client.calls) == 6
    assert all(c["stream"] and c["stream_options"] == {"include_usage": True} for c in client.calls)
    for call in client.calls:
        if len(call["messages"]) > 1:  # a second turn carries the first answer verbatim
            assert call["messages"][1]["role"] == "assistant"
            assert call["messages"][1]["content"].startswith("ok ")
    for r in records:
        assert r.num_cached_tokens == r.num_prompt_tokens // 2 and r.first_token_s >= r.arrival_s
    s = summarize(records)
    assert s["num_errors"] == 0 and s["hit_ratio"] == pytest.approx(
        sum(r.num_cached_tokens for r in records) / sum(r.num_prompt_tokens for r in records))


def test_nonce_opens_every_conversation_and_extra_body_reaches_every_call() -> None:
    w = build_workload("multi_turn_chat", 0, num_clients=2, num_rounds=2, tokens_per_round=32,
                       output_len=16)
    client = FakeClient()
    rep = Replayer(client, "m", w, time_scale=0.0, nonce="run-7",
                   extra_body={"routing_policy": "tinyserve"})
    asyncio.run(rep.run())
    assert len(client.calls) == 4
    for call in client.calls:
        assert call["messages"][0]["content"].startswith("[run-7] ")
        assert call["extra_body"] == {"routing_policy": "tinyserve"}
    plain = FakeClient()
    asyncio.run(Replayer(plain, "m", w, time_scale=0.0).run())
    assert not plain.calls[0]["messages"][0]["content"].startswith("[")
    assert plain.calls[0]["extra_body"] is None


def _row(w: str, p: str, n: int, seed: int, p99: float, hit: float,
         stages: list[float] | None = None) -> dict[str, Any]:
    return {"workload": w, "policy": p, "num_replicas": n, "seed": seed, "ttft_p50_s": p99 / 2,
            "ttft_p90_s": p99 / 1.5, "ttft_p99_s": p99, "throughput_tok_s": 100.0,
            "hit_ratio": hit, "imbalance": 1.0, "usage": 0.5, "utilization": 0.9,
            "f_total": 0.1, "num_preemptions": 0, "sim_wall_s": 1.0,
            "stage_throughput_tok_s": stages or []}


def test_targets_compare_against_best_baseline_of_the_same_run() -> None:
    rows = [_row("a", "tinyserve", 8, s, 0.7, 0.80) for s in (0, 1)]
    rows += [_row("a", "round_robin", 8, s, 2.0, 0.50) for s in (0, 1)]
    rows += [_row("a", "sglang_cache_aware", 8, 0, 1.0, 0.83),
             _row("a", "sglang_cache_aware", 8, 1, 1.2, 0.83)]
    rows += [_row("b2b_saas", "tinyserve", 8, 0, 1.0, 0.8, [10.0, 40.0]),
             _row("b2b_saas", "load_only", 8, 0, 5.0, 0.2, [10.0, 20.0]),
             _row("b2b_saas", "round_robin", 8, 0, 6.0, 0.2, [10.0, 16.0])]
    agg = aggregate(rows)
    sg = next(a for a in agg if a["policy"] == "sglang_cache_aware")
    assert sg["ttft_p99_s"] == pytest.approx(1.1) and sg["seeds"] == [0, 1]
    tg = targets(agg)
    cell = next(c for c in tg["cells"] if c["workload"] == "a")
    assert cell["best_baseline"] == "sglang_cache_aware"
    assert cell["ttft_p99_ratio"] == pytest.approx(0.7 / 1.1)
    assert cell["ttft_0p8"] and cell["ttft_ok"]
    assert cell["hit_gap_points"] == pytest.approx(-3.0) and not cell["hit_ok"]
    b2b = tg["b2b_throughput"][0]
    assert b2b["top_stage_ratio_vs_load_only"] == pytest.approx(2.0)
    assert b2b["top_stage_ratio_vs_round_robin"] == pytest.approx(2.5)
    b2b_cell = next(c for c in tg["cells"] if c["workload"] == "b2b_saas")
    assert b2b_cell["best_baseline"] == "round_robin"  # load_only is the throughput reference only
    text = markdown(agg, tg)
    assert "sglang_cache_aware" in text and "top_stage_ratio_vs_load_only = 2.00" in text
    assert not math.isnan(b2b["overall_ratio_vs_load_only"])
