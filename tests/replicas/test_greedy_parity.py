"""Greedy decoding through the paged engine is token-identical to transformers `generate`:
batched mixed-length prompts, prefix-cache hits, chunked prefill, forced preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
from replica_helpers import hf_greedy, random_prompts

from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def _engine(model_dir: Path, **kw: object) -> LLMEngine:
    args: dict[str, object] = dict(model=str(model_dir), num_blocks=128, block_size=4)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))  # type: ignore[arg-type]


def _assert_parity(model_dir: Path, prompts: list[list[int]], outs: list[list[int]]) -> None:
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        assert out == hf_greedy(model_dir, prompt, MAX_NEW), f"prompt {i} (len {len(prompt)})"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_mixed_lengths_match_transformers(
    family: str, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    model_dir = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    engine = _engine(model_dir)
    prompts = random_prompts(6, [3, 17, 40, 1, 9, 26], seed=11)
    outs = engine.generate(prompts, GREEDY)
    _assert_parity(model_dir, prompts, outs)
    # Every request decoded in one shared batch: fewer steps than requests x tokens.
    assert engine.num_steps < len(prompts) * MAX_NEW
    engine.kv.check_integrity()
    assert engine.stats().num_used_blocks == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_hits_compute_only_uncached_tokens(
    family: str, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    model_dir = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    engine = _engine(model_dir)
    shared = random_prompts(1, [22], seed=3)[0]
    tails = random_prompts(3, [5, 1, 11], seed=4)
    prompts = [shared + t for t in tails]
    first = engine.generate(prompts[:1], GREEDY)
    engine.add_request("hit-a", prompts[1], GREEDY)
    engine.add_request("hit-b", prompts[2], GREEDY)
    outs: dict[str, list[int]] = {"hit-a": [], "hit-b": []}
    cached: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
    # 22 shared tokens = 5 full blocks of 4 are reusable.
    assert cached == {"hit-a": 20, "hit-b": 20}
    _assert_parity(model_dir, prompts, [first[0], outs["hit-a"], outs["hit-b"]])
    assert engine.stats().prefix_hit_tokens >= 40
    engine.kv.check_integrity()


def test_chunked_prefill_matches_transformers(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, max_num_batched_tokens=7)
    prompts = random_prompts(4, [30, 12, 45, 2], seed=21)
    outs = engine.generate(prompts, GREEDY)
    _assert_parity(tiny_llama_dir, prompts, outs)
    # 89 prompt tokens at <= 7 per step needs at least 13 steps of prefill alone.
    assert engine.num_steps >= 13


def test_preemption_by_recompute_matches_transformers(tiny_qwen2_dir: Path) -> None:
    # 10 blocks x 4 slots cannot hold 4 requests of ~20-30 tokens at once.
    engine = _engine(tiny_qwen2_dir, num_blocks=10, enable_prefix_caching=False)
    prompts = random_prompts(4, [14, 9, 18, 11], seed=5)
    outs = engine.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    _assert_parity(tiny_qwen2_dir, prompts, outs)
    engine.kv.check_integrity()
    assert engine.stats().num_used_blocks == 0


def test_preemption_with_prefix_cache_and_chunking(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, num_blocks=12, max_num_batched_tokens=6)
    shared = random_prompts(1, [8], seed=8)[0]
    prompts = [shared + t for t in random_prompts(4, [6, 2, 9, 4], seed=9)]
    outs = engine.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    _assert_parity(tiny_llama_dir, prompts, outs)
    engine.kv.check_integrity()


def test_identical_prompts_in_one_batch_share_the_prefill(tiny_llama_dir: Path) -> None:
    """Parallel samples of one cold prompt compute it once, in the same step: the later ones
    read the K/V the first one writes in that step."""
    engine = _engine(tiny_llama_dir)
    prompt = random_prompts(1, [41], seed=5)[0]
    other = random_prompts(1, [9], seed=6)[0]
    prompts = {"s0": prompt, "s1": prompt, "s2": prompt, "other": other}
    for rid, p in prompts.items():
        engine.add_request(rid, p, GREEDY)
    outs: dict[str, list[int]] = {rid: [] for rid in prompts}
    cached: dict[str, int] = {}
    first_step: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
            first_step.setdefault(out.request_id, engine.num_steps)
    # 41 tokens = 10 full blocks of 4, all reusable (the 41st token is computed anyway).
    assert cached == {"s0": 0, "s1": 40, "s2": 40, "other": 0}
    assert first_step == dict.fromkeys(prompts, 1)  # every first token from the first step
    _assert_parity(tiny_llama_dir, list(prompts.values()), list(outs.values()))
    engine.kv.check_integrity()
