"""Asynchronous scheduling (EngineConfig.async_scheduling) against the synchronous engine on
the same workload: identical tokens, text, finish reasons, cache hits and pool hashes; stops
exact though checked one step late; aborts and preemption while a step is in flight.

Both lanes run here: the CPU worker thread (the forward overlaps the host's Python; most tests
use it, it has the most to get wrong) and the inline lane (what CUDA uses, and CPU by default:
the forward runs on the calling thread)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from replica_helpers import EOS_ID, random_prompts

from replicas.async_scheduling import AsyncStepper
from replicas.config import EngineConfig
from replicas.engine import AsyncLLMEngine
from replicas.llm_engine import LLMEngine
from replicas.outputs import RequestOutput, TokenLogprobs
from replicas.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = -1
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_outputs: int = 0


def _engine(model_dir: Path, async_on: bool, worker: bool = True, **kw: object) -> LLMEngine:
    args: dict[str, object] = dict(
        model=str(model_dir), num_blocks=128, block_size=4, async_scheduling=async_on
    )
    args.update(kw)
    engine = LLMEngine(EngineConfig(**args))  # type: ignore[arg-type]
    if async_on and engine._stepper is not None:
        engine._stepper.close()
        engine._stepper = AsyncStepper(engine, worker_thread=worker)
    return engine


def _record(results: dict[str, Result], out: RequestOutput) -> None:
    r = results.setdefault(out.request_id, Result())
    assert r.finish_reason is None, f"{out.request_id}: output after its last"
    r.tokens += out.new_token_ids
    r.text += out.text_delta
    r.finish_reason = out.finish_reason if out.finished else None
    r.num_cached_tokens = out.num_cached_tokens
    r.logprobs += out.logprobs or []
    r.num_outputs += 1


def _run(
    engine: LLMEngine, work: list[tuple[str, list[int], SamplingParams]]
) -> dict[str, Result]:
    for rid, prompt, params in work:
        engine.add_request(rid, prompt, params)
    results: dict[str, Result] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            _record(results, out)
    assert not engine.has_unfinished_requests()
    engine.kv.check_integrity()
    assert engine.stats().num_used_blocks == 0
    return results


def _both(
    model_dir: Path, work: list[tuple[str, list[int], SamplingParams]], worker: bool = True,
    **kw: object,
) -> tuple[dict[str, Result], dict[str, Result], LLMEngine, LLMEngine]:  # fmt: skip
    sync = _engine(model_dir, False, **kw)
    asyn = _engine(model_dir, True, worker, **kw)
    return _run(sync, work), _run(asyn, work), sync, asyn


def _mixed_work() -> list[tuple[str, list[int], SamplingParams]]:
    prompts = random_prompts(7, [3, 17, 40, 1, 9, 26, 12], seed=11)
    params = [
        GREEDY,
        SamplingParams(max_tokens=5, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.8, seed=5),  # seeded: reproducible
        SamplingParams(max_tokens=9, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.7, top_k=20, top_p=0.9, seed=9),
        SamplingParams(max_tokens=7, temperature=0.0, logit_bias={5: 3.0}),
    ]
    return [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]


@pytest.mark.parametrize("worker", [True, False], ids=["worker-thread", "inline"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mixed_batch_is_identical_to_the_synchronous_engine(
    family: str, worker: bool, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    model_dir = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    work = _mixed_work()
    ref, got, sync, asyn = _both(model_dir, work, worker)
    assert got.keys() == ref.keys()
    for rid in ref:
        a, b = got[rid], ref[rid]
        assert (a.tokens, a.text, a.finish_reason, a.num_cached_tokens) == (
            b.tokens, b.text, b.finish_reason, b.num_cached_tokens,
        ), rid  # fmt: skip
        assert len(a.logprobs) == len(b.logprobs)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.keys() == y.keys()
            assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-5)
    assert len(ref["r3"].logprobs) == 9
    assert sorted(asyn.kv.cached_block_hashes()) == sorted(sync.kv.cached_block_hashes())
    # The pipelined run really had steps in flight: each token is learned one step later.
    assert isinstance(asyn._stepper, AsyncStepper)
    assert asyn._stepper.lane.worker_thread is worker


def test_stops_are_exact_and_discarded_tokens_never_hashed(tiny_llama_dir: Path) -> None:
    """EOS forced at every output index 0..7 (min_tokens + a large EOS bias), a stop token id
    and a stop string taken from a free run, and max_tokens: with block_size 4 some stop
    tokens complete a block and some discarded tokens would start one."""
    prompt = random_prompts(1, [5], seed=3)[0]
    free = _run(_engine(tiny_llama_dir, False), [("free", prompt, GREEDY)])["free"]
    stop_id = free.tokens[6]
    first = free.tokens.index(stop_id)
    word = free.text.split()[4]
    work = [
        (f"eos{k}", prompt, SamplingParams(max_tokens=12, temperature=0.0, min_tokens=k,
                                           logit_bias={EOS_ID: 100.0}))
        for k in range(8)
    ]  # fmt: skip
    work += [
        ("stop-id", prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_id])),
        ("stop-str", prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=[word])),
        ("len", random_prompts(1, [11], seed=8)[0], SamplingParams(max_tokens=9, temperature=0.0)),
    ]  # fmt: skip
    ref, got, sync, asyn = _both(tiny_llama_dir, work)
    for k in range(8):
        assert got[f"eos{k}"].tokens == ref[f"eos{k}"].tokens == [*free.tokens[:k], EOS_ID]
        assert got[f"eos{k}"].finish_reason == "stop"
    assert got["stop-id"].tokens == ref["stop-id"].tokens == free.tokens[: first + 1]
    assert got["stop-str"].text == ref["stop-str"].text
    assert word not in got["stop-str"].text and got["stop-str"].finish_reason == "stop"
    assert got["len"].tokens == ref["len"].tokens and len(got["len"].tokens) == 9
    for rid in ref:
        assert got[rid] == ref[rid], rid
    # No hash covers a token computed past a stop: the pool holds exactly the sync chains.
    assert sorted(asyn.kv.cached_block_hashes()) == sorted(sync.kv.cached_block_hashes())
    # Every stopped request WAS computed once more (the cost of checking one step late) and
    # that token dropped; a request ending by length is not scheduled past its last token.
    assert isinstance(asyn._stepper, AsyncStepper)
    assert asyn._stepper.num_discarded_tokens == 10
    only_len = _engine(tiny_llama_dir, True)
    _run(only_len, [work[-1]])
    assert only_len.num_steps == 9
    assert only_len._stepper is not None and only_len._stepper.num_discarded_tokens == 0


def test_abort_while_its_token_is_in_flight(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, True)
    prompts = random_prompts(3, [6, 14, 9], seed=21)
    for i, p in enumerate(prompts):
        engine.add_request(f"a{i}", p, GREEDY)
    results: dict[str, Result] = {}
    for _ in range(4):
        for out in engine.step():
            _record(results, out)
    assert engine.requests["a1"].num_pending_tokens == 1  # its next token is on the device
    seen = len(results["a1"].tokens)
    aborted = engine.abort("a1")
    assert aborted is not None and aborted.finish_reason == "abort"
    assert aborted.new_token_ids == []  # the pending token is not streamed
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "a1"
            _record(results, out)
    assert len(results["a1"].tokens) == seen
    ref = _run(_engine(tiny_llama_dir, False), [("a0", prompts[0], GREEDY), ("a2", prompts[2], GREEDY)])
    assert results["a0"].tokens == ref["a0"].tokens and results["a2"].tokens == ref["a2"].tokens
    engine.kv.check_integrity()
    assert engine.stats().num_used_blocks == 0


def test_preemption_while_steps_are_in_flight(tiny_qwen2_dir: Path) -> None:
    # 10 blocks x 4 slots cannot hold 4 requests of ~20-30 tokens at once.
    work = [
        (f"p{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        for i, p in enumerate(random_prompts(4, [14, 9, 17, 11], seed=5))
    ]
    ref, got, _, asyn = _both(tiny_qwen2_dir, work, num_blocks=10)
    assert asyn.scheduler.num_preemptions > 0
    assert {r: x.tokens for r, x in got.items()} == {r: x.tokens for r, x in ref.items()}
    assert all(len(x.tokens) == 12 for x in got.values())


def test_penalised_requests_step_synchronously_with_the_same_tokens(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(2, [8, 13], seed=2)
    pen = SamplingParams(max_tokens=10, temperature=0.0, frequency_penalty=1.5,
                         repetition_penalty=1.3)  # fmt: skip
    work = [("pen", prompts[0], pen), ("plain", prompts[1], GREEDY)]
    ref, got, _, asyn = _both(tiny_llama_dir, work)
    assert got == ref
    # Once the penalised request is done, the plain one goes back to the pipelined loop.
    assert asyn.async_scheduling


def test_the_setting_switches_on_a_live_engine_without_losing_tokens(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, True)
    prompt = random_prompts(1, [10], seed=4)[0]
    engine.add_request("x", prompt, GREEDY)
    results: dict[str, Result] = {}
    for _ in range(3):
        for out in engine.step():
            _record(results, out)
    for out in engine.set_async_scheduling(False):  # drains the step in flight
        _record(results, out)
    assert not engine.async_scheduling and engine.requests["x"].num_pending_tokens == 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            _record(results, out)
    ref = _run(_engine(tiny_llama_dir, False), [("x", prompt, GREEDY)])
    assert results["x"].tokens == ref["x"].tokens


def test_streaming_engine_with_async_scheduling(tiny_llama_dir: Path) -> None:
    """Through AsyncLLMEngine: concurrent streams and n=3 parallel sampling give the sync
    engine's tokens; the prompt's full blocks are still computed once for the n children."""
    prompts = random_prompts(3, [7, 19, 40], seed=31)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)

    def run(async_on: bool) -> tuple[list[list[int]], dict[int, list[int]], int]:
        eng = AsyncLLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=96,
                                          block_size=16, async_scheduling=async_on))  # fmt: skip

        async def one(rid: str, p: list[int]) -> list[int]:
            return [t async for o in eng.generate(rid, p, GREEDY) for t in o.new_token_ids]

        async def main() -> tuple[list[list[int]], list[RequestOutput]]:
            singles = asyncio.gather(*(one(f"s{i}", p) for i, p in enumerate(prompts)))
            par = [o async for o in eng.generate("par", prompts[2], seeded, n=3)]
            return list(await singles), par

        singles, par = asyncio.run(main())
        by_index: dict[int, list[int]] = {}
        cached = 0
        for o in par:
            by_index.setdefault(o.index, []).extend(o.new_token_ids)
            cached += o.num_cached_tokens if o.finished else 0
        asyncio.run(eng.shutdown())
        eng.engine.kv.check_integrity()
        return singles, by_index, cached

    assert run(True) == run(False)


def test_a_failed_step_in_flight_fails_its_streams_and_recovers(tiny_llama_dir: Path) -> None:
    eng = AsyncLLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=32, block_size=4,
                                      async_scheduling=True))  # fmt: skip
    prompt = random_prompts(1, [18], seed=48)[0]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    runner = eng.engine.runner
    execute = runner.execute
    calls = 0

    def flaky(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:  # a decode step, launched while the previous one is in flight
            raise RuntimeError("device lost")
        return execute(*args)  # type: ignore[arg-type]

    runner.execute = flaky  # type: ignore[method-assign]

    async def collect(rid: str) -> list[int]:
        return [t async for o in eng.generate(rid, prompt, params) for t in o.new_token_ids]

    with pytest.raises(RuntimeError, match=r"engine step failed.*device lost"):
        asyncio.run(collect("a"))
    assert eng.engine.kv.cached_block_hashes() == []
    assert not eng.engine.has_unfinished_requests()
    tokens = asyncio.run(collect("b"))
    ref = _run(_engine(tiny_llama_dir, False, num_blocks=32), [("b", prompt, params)])
    assert tokens == ref["b"].tokens
    asyncio.run(eng.shutdown())
