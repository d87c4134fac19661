"""Parallel sampling (n > 1) through the async engine: one prefill of the prompt's full
blocks shared by every sequence, per-child seeds, interleaved indexed deltas, abort."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from replica_helpers import random_prompts

from replicas.config import EngineConfig
from replicas.engine import AsyncLLMEngine, RequestOutput, SamplingParams
from replicas.parallel_sampling import child_params


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> AsyncLLMEngine:
    return AsyncLLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=96, block_size=16))


async def _collect(
    engine: AsyncLLMEngine, rid: str, prompt: list[int], params: SamplingParams, n: int = 1
) -> list[RequestOutput]:
    return [out async for out in engine.generate(rid, prompt, params, n=n)]


def _by_index(outs: list[RequestOutput]) -> dict[int, list[RequestOutput]]:
    groups: dict[int, list[RequestOutput]] = {}
    for out in outs:
        groups.setdefault(out.index, []).append(out)
    return groups


def test_n4_shares_the_prompt_blocks_and_samples_with_seed_plus_index(
    engine: AsyncLLMEngine,
) -> None:
    prompt = random_prompts(1, [40], seed=11)[0]  # 2 full blocks of 16 + 8 tokens
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    before = engine.stats()
    outs = asyncio.run(_collect(engine, "par", prompt, params, n=4))
    after = engine.stats()
    groups = _by_index(outs)
    assert sorted(groups) == [0, 1, 2, 3]
    # NOTE: the 4 sequences' prompt queries: the first computes the 2 full blocks, the
    # 3 others hit them in the same step (one prefill of the shared part).
    assert after.prefix_query_tokens - before.prefix_query_tokens == 4 * 40
    assert after.prefix_hit_tokens - before.prefix_hit_tokens == 3 * 32
    cached = sorted(g[-1].num_cached_tokens for g in groups.values())
    assert cached == [0, 32, 32, 32]
    samples = {i: [t for o in g for t in o.new_token_ids] for i, g in groups.items()}
    assert all(len(s) == 8 and g[-1].finished for s, g in zip(samples.values(), groups.values(),
                                                               strict=True))
    assert len({tuple(s) for s in samples.values()}) > 1
    # Each child is the single request with seed + index, whatever it was batched with.
    for i in range(4):
        alone = asyncio.run(_collect(engine, f"alone{i}", prompt, child_params(params, i)))
        assert [t for o in alone for t in o.new_token_ids] == samples[i]
    # Deltas of different children interleave in one stream.
    order = [o.index for o in outs]
    assert order != sorted(order)


def test_leaving_a_parallel_stream_early_aborts_every_child(engine: AsyncLLMEngine) -> None:
    prompt = random_prompts(1, [9], seed=12)[0]
    params = SamplingParams(max_tokens=200, temperature=1.0, ignore_eos=True)

    async def main() -> None:
        async for _ in engine.generate("early", prompt, params, n=3):
            break
        for _ in range(200):
            if not engine.engine.requests:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not engine.engine.requests
    with pytest.raises(ValueError, match="n must be"):
        engine.generate("bad", prompt, params, n=0)
