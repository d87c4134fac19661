"""logit_bias, min_tokens and repetition_penalty: on synthetic logits (repetition penalty
against vLLM's own ``apply_penalties``) and through the engine on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from replica_helpers import EOS_ID, random_prompts

from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.request import Request
from replicas.sampler import Sampler, apply_penalties
from replicas.sampling_params import SamplingParams


def _req(params: SamplingParams, prompt: list[int], outputs: list[int]) -> Request:
    return Request(
        request_id="r",
        prompt_token_ids=prompt,
        params=params,
        eos_token_ids=frozenset({EOS_ID}),
        arrival_index=0,
        token_ids=prompt + outputs,
    )


def test_repetition_penalty_matches_vllm() -> None:
    utils = pytest.importorskip("vllm.model_executor.layers.utils")
    gen = torch.Generator().manual_seed(0)
    vocab = 64
    logits = torch.randn(vocab, generator=gen) * 3
    prompt, outputs = [3, 5, 5, 9], [9, 11, 40, 11]
    params = SamplingParams(
        repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25
    )
    ours = apply_penalties(logits, outputs, params, prompt)
    theirs = utils.apply_penalties(
        logits.clone()[None],
        torch.tensor([prompt]),
        torch.tensor([outputs]),
        torch.tensor([0.5]),
        torch.tensor([0.25]),
        torch.tensor([1.3]),
    )[0]
    torch.testing.assert_close(ours, theirs)
    assert not torch.equal(ours, logits)


def test_logit_bias_and_min_tokens_on_synthetic_rows() -> None:
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.zeros(2, 16)
    logits[:, EOS_ID] = 5.0  # EOS is the argmax of both rows
    early = _req(SamplingParams(temperature=0, min_tokens=2), [4], [7])
    biased = _req(SamplingParams(temperature=0, logit_bias={12: 100.0}), [4], [])
    out = sampler(logits, [early, biased]).token_ids
    assert out[0] != EOS_ID  # one output so far < min_tokens=2: EOS masked
    assert out[1] == 12
    done = _req(SamplingParams(temperature=0, min_tokens=1), [4], [7])
    assert sampler(logits[:1], [done]).token_ids == [EOS_ID]
    # NOTE: the sampler never mutates the runner's logits.
    assert logits[0, EOS_ID] == 5.0 and logits[1, 12] == 0.0


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_blocks=64, block_size=16))


def test_min_tokens_holds_eos_back_then_lets_it_end(engine: LLMEngine) -> None:
    prompt = random_prompts(1, [12], seed=3)[0]
    eos = {EOS_ID: 100.0}
    free = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, logit_bias=eos))
    assert free[0] == [EOS_ID]
    held = engine.generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0, logit_bias=eos, min_tokens=4)
    )
    assert len(held[0]) == 5 and held[0][-1] == EOS_ID and EOS_ID not in held[0][:4]


def test_logit_bias_bans_the_greedy_choice_and_batches_with_plain_rows(engine: LLMEngine) -> None:
    prompts = random_prompts(2, [10, 14], seed=4)
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = engine.generate(prompts, plain)
    banned = {t: -100.0 for t in set(ref[0])}
    both = engine.generate(
        prompts,
        [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias=banned), plain],
    )
    assert not set(both[0]) & set(banned)
    assert both[1] == ref[1]  # the biased row does not leak into its batch neighbour


def test_repetition_penalty_changes_greedy_output_and_bad_values_are_refused(
    engine: LLMEngine,
) -> None:
    prompt = random_prompts(1, [8], seed=5)[0]
    base = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    pen = engine.generate(
        [prompt],
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=2.0),
    )
    # NOTE: greedy on a random model repeats; a strong penalty leaves fewer repeats.
    assert len(set(pen[0])) > len(set(base[0]))
    for bad in (
        SamplingParams(repetition_penalty=0.0),
        SamplingParams(min_tokens=20, max_tokens=4),
        SamplingParams(logit_bias={1: 101.0}),
        SamplingParams(logit_bias={10_000: 1.0}),
    ):
        with pytest.raises(ValueError):
            engine.validate("x", prompt, bad)
