"""Sampler behaviour on synthetic logits, and seeded sampling through the engine."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from replica_helpers import random_prompts

from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.request import Request
from replicas.sampler import Sampler, apply_penalties, filter_logits
from replicas.sampling_params import SamplingParams


def _req(
    params: SamplingParams, outputs: list[int] | None = None, seed: int | None = None
) -> Request:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    prompt = [0, 1]
    return Request(
        request_id="r",
        prompt_token_ids=prompt,
        params=params,
        eos_token_ids=frozenset(),
        arrival_index=0,
        token_ids=prompt + (outputs or []),
        generator=gen,
    )


def _draw(logits: torch.Tensor, params: SamplingParams, n: int) -> Counter[int]:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    req = _req(params)
    return Counter(sampler(logits[None, :], [req]).token_ids[0] for _ in range(n))


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])


def test_greedy_is_argmax() -> None:
    counts = _draw(LOGITS, SamplingParams(temperature=0.0), 5)
    assert counts == Counter({0: 5})


def test_top_k_restricts_support() -> None:
    counts = _draw(LOGITS, SamplingParams(temperature=1.0, top_k=2), 300)
    assert set(counts) == {0, 1}


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = LOGITS.softmax(-1)
    # mass of tokens 0 and 1 is ~0.59: top_p 0.5 keeps {0, 1}, 0.3 keeps {0}.
    assert float(probs[0]) < 0.5 < float(probs[:2].sum())
    assert set(_draw(LOGITS, SamplingParams(top_p=0.5), 300)) == {0, 1}
    assert set(_draw(LOGITS, SamplingParams(top_p=0.3), 50)) == {0}


def test_min_p_drops_unlikely_tokens() -> None:
    filtered = filter_logits(LOGITS, SamplingParams(min_p=0.3))
    probs = LOGITS.softmax(-1)
    kept = {i for i in range(6) if math.isfinite(float(filtered[i]))}
    assert kept == {i for i in range(6) if probs[i] >= 0.3 * probs.max()}
    assert kept == {0, 1, 2}


def test_temperature_sharpens_distribution() -> None:
    cold = _draw(LOGITS, SamplingParams(temperature=0.2), 400)
    hot = _draw(LOGITS, SamplingParams(temperature=2.0), 400)
    assert cold[0] > hot[0]
    assert len(hot) > len(cold)


def test_penalties_count_output_tokens_only() -> None:
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(LOGITS.clone(), [1, 1, 3], params)
    expected = LOGITS.clone()
    expected[1] -= 2 * 0.5 + 0.25
    expected[3] -= 0.5 + 0.25
    assert torch.allclose(out, expected)
    # The penalty flips greedy choice away from a repeated token.
    strong = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    picked = sampler(LOGITS[None, :].clone(), [_req(strong, outputs=[0])]).token_ids[0]
    assert picked == 1


def test_greedy_batch_penalises_only_its_penalised_rows_and_keeps_logits() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    plain = SamplingParams(temperature=0.0)
    strong = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    for extra in ([], [SamplingParams(temperature=1.0, top_k=1)]):
        params = [plain, strong, *extra]
        logits = LOGITS[None, :].repeat(len(params), 1)
        before = logits.clone()
        reqs = [_req(p, outputs=[0]) for p in params]
        picked = sampler(logits, reqs).token_ids
        assert picked[:2] == [0, 1]  # the penalty moves only the penalised row off token 0
        assert torch.equal(logits, before)


def test_logprobs_are_raw_log_softmax_and_include_sampled() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    req = _req(SamplingParams(temperature=1.0, top_k=1, logprobs=2))
    out = sampler(LOGITS[None, :].clone(), [req])
    lp = out.logprobs[0]
    assert lp is not None
    ref = LOGITS.log_softmax(-1)
    assert set(lp) == {0, 1}
    for tok, value in lp.items():
        assert value == pytest.approx(float(ref[tok]))


def test_seeded_draws_do_not_depend_on_batch() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    alone = [sampler(logits[1:2], [_req(params, seed=42)]).token_ids[0] for _ in range(20)]
    together = [
        sampler(logits, [_req(params), _req(params, seed=42), _req(params)]).token_ids[1]
        for _ in range(20)
    ]
    assert alone == together
    assert len(set(alone)) == 1  # a fresh generator with the same seed: the same first draw


def test_engine_seeded_sampling_is_reproducible(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(3, [6, 13, 4], seed=2)

    def run(seeds: list[int]) -> list[list[int]]:
        engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, block_size=4))
        params = [
            SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=s, ignore_eos=True)
            for s in seeds
        ]
        return engine.generate(prompts, params)

    a, b = run([1, 2, 3]), run([1, 2, 3])
    assert a == b
    c = run([4, 5, 6])
    assert c != a


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("temperature", -0.5, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_k", -3, "top_k"),
        ("min_p", 1.5, "min_p"),
        ("presence_penalty", 3.0, "presence_penalty"),
        ("frequency_penalty", -2.5, "frequency_penalty"),
        ("max_tokens", 0, "max_tokens"),
        ("logprobs", 50, "logprobs"),
    ],
)
def test_invalid_sampling_values_are_named(field: str, value: float, needle: str) -> None:
    params = SamplingParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=needle):
        params.validate(vocab_size=100)
