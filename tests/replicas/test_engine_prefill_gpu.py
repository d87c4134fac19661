"""The engine's greedy tokens with the Triton paged prefill kernel against gather + SDPA
(TINYSERVE_PREFILL_BACKEND), bf16 on CUDA, on test_engine_gpu's head_dim-64 checkpoint
(marked `gpu`).

Tokens must be identical, except that a sequence may diverge at a near tie: the two tokens
chosen there must be within bf16 noise of each other in the fp32 transformers logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from replica_helpers import random_prompts

# NOTE: the checkpoint fixture, greedy params and bf16 budget are test_engine_gpu's own.
from test_engine_gpu import BF16_TOL, GREEDY, _engine, hd64_llama_dir  # noqa: F401

pytestmark = pytest.mark.gpu


def _run(
    model_dir: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[list[int]], int, int]:
    from cuda_kernels import prefill_triton

    calls = [0]
    launcher = prefill_triton.paged_prefill_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls[0] += 1
        return launcher(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setenv("TINYSERVE_PREFILL_BACKEND", backend)
        m.setattr(prefill_triton, "paged_prefill_attention", counted)
        engine = _engine(model_dir, "cuda", "bfloat16", block_size=16, cuda_graphs=True)
        warm_up_calls, calls[0] = calls[0], 0  # NOTE: the steps' calls, not the start-up one
        prompts = random_prompts(6, [3, 17, 40, 1, 9, 70], seed=11)
        hits = [prompts[5][:64] + t for t in random_prompts(2, [5, 33], seed=4)]
        outs = engine.generate(prompts, GREEDY) + engine.generate(hits, GREEDY)
        assert engine.stats().prefix_hit_tokens >= 2 * 64
        engine.kv.check_integrity()
    return outs, warm_up_calls, calls[0]


def test_greedy_tokens_triton_vs_sdpa(
    hd64_llama_dir: Path,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import AutoModelForCausalLM

    sdpa, sdpa_warm, sdpa_calls = _run(hd64_llama_dir, "sdpa", monkeypatch)
    tri, tri_warm, tri_calls = _run(hd64_llama_dir, "triton", monkeypatch)
    assert (sdpa_warm, sdpa_calls) == (0, 0)
    assert tri_warm == 1 and tri_calls > 0  # compiled at start-up, then used by the steps
    prompts = random_prompts(6, [3, 17, 40, 1, 9, 70], seed=11)
    prompts += [prompts[5][:64] + t for t in random_prompts(2, [5, 33], seed=4)]
    ref = AutoModelForCausalLM.from_pretrained(str(hd64_llama_dir), dtype=torch.float32).eval()
    same = 0
    for prompt, a, b in zip(prompts, sdpa, tri, strict=True):
        if a == b:
            same += 1
            continue
        j = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + a[:j]])).logits[0, -1]
        gap = float((logits[a[j]] - logits[b[j]]).abs() / logits.abs().max())
        assert gap <= BF16_TOL, f"diverged at token {j} without a near tie (gap {gap:.3f})"
    assert same >= len(prompts) // 2, f"only {same} of {len(prompts)} sequences identical"
