"""AsyncLLMEngine: streaming, stop conditions, abort, bad input, accounting, pool pass-through."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from replica_helpers import EOS_ID, hf_greedy, random_prompts

from kvmanager.events import BlockStored
from replicas.config import EngineConfig
from replicas.engine import AsyncLLMEngine, RequestOutput, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> AsyncLLMEngine:
    return AsyncLLMEngine(
        EngineConfig(model=str(tiny_llama_dir), num_blocks=48, block_size=4, max_model_len=128)
    )


async def _collect(
    engine: AsyncLLMEngine, rid: str, prompt: list[int], params: SamplingParams
) -> list[RequestOutput]:
    return [out async for out in engine.generate(rid, prompt, params)]


def test_concurrent_streams_match_reference(engine: AsyncLLMEngine, tiny_llama_dir: Path) -> None:
    prompts = random_prompts(3, [7, 19, 3], seed=31)
    params = SamplingParams(max_tokens=9, temperature=0.0)

    async def main() -> list[list[RequestOutput]]:
        return list(
            await asyncio.gather(
                *(_collect(engine, f"s{i}", p, params) for i, p in enumerate(prompts))
            )
        )

    streams = asyncio.run(main())
    for prompt, outs in zip(prompts, streams, strict=True):
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == hf_greedy(tiny_llama_dir, prompt, 9)
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        last = outs[-1]
        assert last.num_prompt_tokens == len(prompt)
        assert last.num_output_tokens == len(tokens)
        assert last.finish_reason == ("stop" if tokens[-1] == EOS_ID else "length")
        m = last.metrics
        assert m.queue_time_s is not None and m.ttft_s is not None
        assert 0.0 <= m.queue_time_s <= m.ttft_s
        if len(tokens) > 1:
            assert m.tpot_s is not None and m.tpot_s >= 0.0
        # Streaming text deltas concatenate to the decoded continuation of the prompt.
        text = "".join(o.text_delta for o in outs)
        assert text.strip() == engine.tokenizer.decode(tokens, skip_special_tokens=True)
        assert engine.tokenizer.decode(prompt + tokens, skip_special_tokens=True).endswith(text)


def test_a_slow_consumer_gets_merged_deltas_with_the_same_tokens(
    engine: AsyncLLMEngine, tiny_llama_dir: Path
) -> None:
    prompt = random_prompts(1, [11], seed=5)[0]
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)

    async def slow() -> list[RequestOutput]:
        outs = []
        async for out in engine.generate("slow", prompt, params):
            outs.append(out)
            await asyncio.sleep(0.2)  # NOTE: the engine runs several steps meanwhile.
        return outs

    outs = asyncio.run(slow())
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == hf_greedy(tiny_llama_dir, prompt, 12)
    assert len(outs) < len(tokens)  # some deltas carried several tokens
    assert sum(len(o.logprobs or []) for o in outs) == len(tokens)
    assert outs[-1].finished and outs[-1].num_output_tokens == len(tokens)


def test_stream_interval_groups_tokens_but_never_delays_the_first(tiny_llama_dir: Path) -> None:
    eng = AsyncLLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=48, block_size=4,
                                      max_model_len=128, stream_interval=4))
    step = eng.engine.step

    def paced_step() -> list[RequestOutput]:
        # NOTE: a step at least 20 ms long, so the consumer drains each step's output before
        # the next arrives even on a loaded box (else queued outputs merge, by design).
        time.sleep(0.02)
        return step()

    eng.engine.step = paced_step  # type: ignore[method-assign]
    prompt = random_prompts(1, [9], seed=8)[0]
    params = SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True)
    outs = asyncio.run(_collect(eng, "grouped", prompt, params))
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == hf_greedy(tiny_llama_dir, prompt, 11)[: len(tokens)] and len(tokens) == 11
    assert len(outs[0].new_token_ids) == 1  # TTFT: the first token goes alone
    assert all(len(o.new_token_ids) >= 4 for o in outs[1:-1])
    assert outs[-1].finished and [len(o.new_token_ids) for o in outs] == [1, 4, 4, 2]


def test_stop_string_token_and_ignore_eos(engine: AsyncLLMEngine) -> None:
    prompt = random_prompts(1, [8], seed=41)[0]
    free = asyncio.run(
        _collect(
            engine, "free", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        )
    )
    tokens = [t for o in free for t in o.new_token_ids]
    assert len(tokens) == 8 and free[-1].finish_reason == "length"
    words = engine.tokenizer.decode(tokens).split()
    # Stop string = the 3rd generated word: text ends before it, finish_reason "stop".
    stop_word = words[2]
    cut = asyncio.run(
        _collect(
            engine,
            "cut",
            prompt,
            SamplingParams(max_tokens=8, temperature=0, stop=[stop_word], ignore_eos=True),
        )
    )
    text = "".join(o.text_delta for o in cut)
    assert cut[-1].finish_reason == "stop"
    assert stop_word not in text
    assert text.strip() == " ".join(words[: words.index(stop_word)])
    by_id = asyncio.run(
        _collect(
            engine,
            "tid",
            prompt,
            SamplingParams(
                max_tokens=8, temperature=0, stop_token_ids=[tokens[1]], ignore_eos=True
            ),
        )
    )
    got = [t for o in by_id for t in o.new_token_ids]
    assert got == tokens[: tokens.index(tokens[1]) + 1]
    assert by_id[-1].finish_reason == "stop"


def test_logprobs_streamed_per_token(engine: AsyncLLMEngine) -> None:
    prompt = random_prompts(1, [5], seed=43)[0]
    outs = asyncio.run(
        _collect(
            engine,
            "lp",
            prompt,
            SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True),
        )
    )
    for o in outs:
        assert o.logprobs is not None and len(o.logprobs) == len(o.new_token_ids)
        for tok, lp in zip(o.new_token_ids, o.logprobs, strict=True):
            # Greedy: the sampled token is the most likely one.
            assert tok in lp and lp[tok] == max(lp.values()) and len(lp) == 3


def test_abort_mid_stream_frees_blocks(engine: AsyncLLMEngine) -> None:
    prompt = random_prompts(1, [10], seed=44)[0]

    async def main() -> list[RequestOutput]:
        seen: list[RequestOutput] = []
        async for out in engine.generate(
            "ab", prompt, SamplingParams(max_tokens=60, ignore_eos=True)
        ):
            seen.append(out)
            if len(seen) == 2:
                engine.abort("ab")
        return seen

    seen = asyncio.run(main())
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert seen[-1].num_output_tokens < 60
    assert engine.stats().num_used_blocks == 0
    engine.engine.kv.check_integrity()


def test_breaking_out_of_stream_aborts(engine: AsyncLLMEngine) -> None:
    prompt = random_prompts(1, [6], seed=45)[0]

    async def main() -> None:
        async for _ in engine.generate(
            "brk", prompt, SamplingParams(max_tokens=60, ignore_eos=True)
        ):
            break
        # Let the driver apply the abort.
        for _ in range(50):
            if "brk" not in engine.engine.requests:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert "brk" not in engine.engine.requests
    assert engine.stats().num_used_blocks == 0


@pytest.mark.parametrize(
    ("prompt_len", "params", "needle"),
    [
        (0, SamplingParams(max_tokens=4), "empty"),
        (100, SamplingParams(max_tokens=40), "max_model_len 128"),
        (10, SamplingParams(max_tokens=4, top_p=2.0), "top_p"),
        (10, SamplingParams(max_tokens=4, stop_token_ids=[10_000]), "stop_token_ids"),
    ],
)
def test_bad_input_raises_at_generate(
    engine: AsyncLLMEngine, prompt_len: int, params: SamplingParams, needle: str
) -> None:
    prompt = random_prompts(1, [max(prompt_len, 1)], seed=46)[0][:prompt_len]
    with pytest.raises(ValueError, match=needle):
        engine.generate("bad", prompt, params)
    assert "bad" not in engine.engine.requests


def test_request_that_never_fits_the_pool(tiny_llama_dir: Path) -> None:
    small = AsyncLLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=4, block_size=4))
    with pytest.raises(ValueError, match="num_blocks=4"):
        small.generate("huge", list(range(3, 20)), SamplingParams(max_tokens=4))
    # A request that fits is still served.
    outs = asyncio.run(
        _collect(small, "ok", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    )
    assert outs[-1].num_output_tokens == 3


def test_prefix_hit_accounting_and_events(engine: AsyncLLMEngine) -> None:
    engine.take_events()
    prompt = random_prompts(1, [18], seed=47)[0]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    cold = asyncio.run(_collect(engine, "cold", prompt, params))
    events = engine.take_events()
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert len(stored) >= 4  # 18 prompt tokens -> 4 full blocks of 4 hashed
    warm = asyncio.run(_collect(engine, "warm", prompt, params))
    assert cold[-1].num_cached_tokens == 0
    assert warm[-1].num_cached_tokens == 16
    assert engine.stats().prefix_hit_tokens >= 16


def test_shutdown_ends_open_streams(tiny_llama_dir: Path) -> None:
    eng = AsyncLLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=32, block_size=4))

    async def main() -> RequestOutput:
        stream = eng.generate("long", [3, 4, 5], SamplingParams(max_tokens=100, ignore_eos=True))
        first = await anext(stream)
        assert not first.finished
        await eng.shutdown()
        rest = [o async for o in stream]
        return rest[-1]

    last = asyncio.run(main())
    assert last.finished and last.finish_reason == "abort"


def test_a_failed_step_fails_its_streams_and_drops_the_prefix_cache(tiny_llama_dir: Path) -> None:
    eng = AsyncLLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=32, block_size=4))
    prompt = random_prompts(1, [18], seed=48)[0]
    params = SamplingParams(max_tokens=3, temperature=0.0)
    runner = eng.engine.runner
    execute = runner.execute

    def broken(chunks: object) -> object:
        raise RuntimeError("device lost")

    runner.execute = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"engine step failed.*device lost"):
        asyncio.run(_collect(eng, "a", prompt, params))
    # Blocks were hashed when scheduled but their K/V never written: nothing may stay cached.
    assert eng.engine.kv.cached_block_hashes() == []
    runner.execute = execute  # type: ignore[method-assign]
    outs = asyncio.run(_collect(eng, "b", prompt, params))
    assert outs[-1].num_cached_tokens == 0
    assert [t for o in outs for t in o.new_token_ids] == hf_greedy(tiny_llama_dir, prompt, 3)


def test_the_core_steps_while_the_event_loop_is_blocked(
    engine: AsyncLLMEngine, tiny_llama_dir: Path
) -> None:
    """The engine core has its own thread: a loop stuck in synchronous work does not stop
    generation, and what was produced meanwhile arrives merged, in order."""
    prompt = random_prompts(1, [6], seed=61)[0]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[int, list[RequestOutput]]:
        stream = engine.generate("blocked", prompt, params)
        outs = [await stream.__anext__()]
        before = engine.engine.num_steps
        # NOTE: no await here: this loop is blocked until the core has stepped 3 more times
        # (the deadline only keeps a broken engine from hanging the test).
        deadline = time.monotonic() + 60
        while engine.engine.num_steps < before + 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        stepped = engine.engine.num_steps - before
        outs += [o async for o in stream]
        return stepped, outs

    stepped, outs = asyncio.run(main())
    assert stepped >= 3
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == hf_greedy(tiny_llama_dir, prompt, 10)
    assert len(outs[1].new_token_ids) >= 3  # the steps run while blocked, as one delta


def test_streams_from_several_event_loops_share_one_core(
    engine: AsyncLLMEngine, tiny_llama_dir: Path
) -> None:
    prompts = random_prompts(3, [5, 9, 13], seed=71)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        outs = asyncio.run(_collect(engine, f"loop{i}", prompts[i], params))
        results[i] = [t for o in outs for t in o.new_token_ids]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, prompt in enumerate(prompts):
        assert results[i] == hf_greedy(tiny_llama_dir, prompt, 6)


def _idle_checks(tiny_llama_dir: Path, after_s: float, wait_for_one: bool) -> list[float]:
    """Times of the pool checks of an engine with ``idle_check_after_s=after_s`` that served
    two requests back to back (then waited up to 5 s for a check when ``wait_for_one``)."""
    cfg = EngineConfig(model=str(tiny_llama_dir), num_blocks=48, block_size=4, max_model_len=128)
    eng = AsyncLLMEngine(cfg, idle_check_after_s=after_s)
    calls: list[float] = []
    check = eng.engine.kv.check_integrity

    def counted() -> None:
        calls.append(time.monotonic())
        check()

    eng.engine.kv.check_integrity = counted  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=3, temperature=0.0)

    async def main() -> None:
        for i in range(2):
            await _collect(eng, f"q{i}", [5, 6, 7], params)
        deadline = time.monotonic() + 5.0
        while wait_for_one and not calls and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await eng.shutdown()

    asyncio.run(main())
    return calls


def test_integrity_check_waits_for_a_quiet_spell(tiny_llama_dir: Path) -> None:
    """The pool check runs once the replica has been idle ``idle_check_after_s``, never right
    after a request (where it delayed the last output and the next request)."""
    assert _idle_checks(tiny_llama_dir, 60.0, wait_for_one=False) == []
    assert len(_idle_checks(tiny_llama_dir, 0.05, wait_for_one=True)) >= 1
