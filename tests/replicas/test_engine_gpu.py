"""The engine on CUDA (cuda_kernels' CUDA entry points, CUDA-graph decode) against the CPU
reference path, on tiny random Llama checkpoints. Needs a GPU (``@pytest.mark.gpu``).

- fp32: GPU greedy tokens are IDENTICAL to a CPU fp32 run of the same checkpoint (batch of
  mixed-length prompts, then prefix hits). fp32 decode attention runs the torch reference on
  the GPU (the CUDA decode kernel is fp16/bf16 only); K/V writes run the CUDA kernel.
- bf16 (head_dim 64, block_size 16: the shapes the CUDA decode kernel instantiates): eager
  and CUDA-graph runs are checked token by token against float32 transformers logits on the
  same sequence (teacher forcing): each chosen token must be the reference argmax or within
  bf16 noise of it. NOTE: exact equality is not asserted in bf16; CPU and GPU reduce in
  different orders, so a near-tie can legitimately flip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from replica_helpers import EOS_ID, VOCAB, random_prompts

from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

MAX_NEW = 12
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
# bf16 logit error budget, relative to the reference logits' max |value| (measured on CPU
# bf16 for this checkpoint: worst gap ~1%).
BF16_TOL = 0.04


def _engine(model_dir: Path, device: str, dtype: str, **kw: object) -> LLMEngine:
    args: dict[str, object] = dict(
        model=str(model_dir), device=device, dtype=dtype, num_blocks=256, block_size=4
    )
    args.update(kw)
    return LLMEngine(EngineConfig(**args))  # type: ignore[arg-type]


def _workload(engine: LLMEngine) -> tuple[list[list[int]], list[int]]:
    """Mixed-length batch, then two prompts sharing the first prompt's prefix (cache hits)
    and two copies of a cold prompt (the second reads the K/V the first writes in the same
    step). Returns every output and the cached-token counts of those four requests."""
    mixed = random_prompts(6, [3, 17, 40, 1, 9, 70], seed=11)
    outs = engine.generate(mixed, GREEDY)
    shared = mixed[5][:64]
    cold = random_prompts(1, [30], seed=9)[0]
    hits = [shared + t for t in random_prompts(2, [5, 1], seed=4)] + [cold, cold]
    for i, p in enumerate(hits):
        engine.add_request(f"hit-{i}", p, GREEDY)
    hit_out: dict[str, list[int]] = {f"hit-{i}": [] for i in range(len(hits))}
    cached: list[int] = [0] * len(hits)
    while engine.has_unfinished_requests():
        for out in engine.step():
            hit_out[out.request_id].extend(out.new_token_ids)
            cached[int(out.request_id[-1])] = out.num_cached_tokens
    engine.kv.check_integrity()
    return [*outs, *hit_out.values()], cached


def test_fp32_gpu_tokens_equal_cpu(tiny_llama_dir: Path) -> None:
    cpu_out, cpu_cached = _workload(_engine(tiny_llama_dir, "cpu", "float32"))
    gpu = _engine(tiny_llama_dir, "cuda", "float32")
    assert gpu.runner.graphs is None  # fp32 decode is the torch reference: not capturable
    gpu_out, gpu_cached = _workload(gpu)
    assert gpu_cached == cpu_cached
    assert min(gpu_cached[:2]) >= 60  # the 64 shared tokens = 16 full blocks of 4 (- the last)
    assert gpu_cached[2:] == [0, 28]  # 30 tokens: 7 full blocks shared within the step
    assert gpu_out == cpu_out
    assert all(len(o) == MAX_NEW for o in gpu_out)


@pytest.fixture(scope="module")
def hd64_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with head_dim 64 (4 heads, 2 KV heads): CUDA decode kernel shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4321)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.05,
        eos_token_id=EOS_ID,
        bos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("hd64_llama")
    LlamaForCausalLM(cfg).float().eval().save_pretrained(str(path))
    return path


def _max_gap(model_dir: Path, prompts: list[list[int]], outs: list[list[int]]) -> float:
    """Largest (reference max logit - reference logit of the chosen token), over every
    generated token, relative to that row's max |logit| (float32 transformers, CPU)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    worst = 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt + out[:-1]])
        with torch.no_grad():
            logits = ref(ids).logits[0, len(prompt) - 1 :]  # row j predicts out[j]
        chosen = logits[torch.arange(len(out)), torch.tensor(out)]
        gap = (logits.max(-1).values - chosen) / logits.abs().max(-1).values
        worst = max(worst, float(gap.max()))
    return worst


def test_bf16_kernels_and_graphs_follow_fp32_reference(hd64_llama_dir: Path) -> None:
    prompts = random_prompts(6, [3, 17, 40, 1, 9, 70], seed=11)
    shared = prompts[5][:64]
    eager = _engine(hd64_llama_dir, "cuda", "bfloat16", block_size=16, cuda_graphs=False)
    graphs = _engine(hd64_llama_dir, "cuda", "bfloat16", block_size=16, cuda_graphs=True)
    assert eager.runner.graphs is None and graphs.runner.graphs is not None
    # every (batch bucket, width bucket) pair is captured at start-up, none inside a step
    dg = graphs.runner.graphs
    widths = {dg.width_bucket(w) for w in range(1, dg.max_blocks + 1)}
    at_start = dg.captured
    assert at_start == sorted((b, w) for b in dg.buckets for w in widths)
    cold = random_prompts(1, [40], seed=9)[0]  # twice in one step: 2 blocks of 16 shared
    hit_prompts = [shared + t for t in random_prompts(2, [5, 1], seed=4)] + [cold, cold]
    results = {}
    for name, engine in (("eager", eager), ("graphs", graphs)):
        outs = engine.generate(prompts, GREEDY)
        outs += engine.generate(hit_prompts, GREEDY)
        assert engine.stats().prefix_hit_tokens >= 2 * 64 + 32
        engine.kv.check_integrity()
        results[name] = outs
    assert graphs.runner.graphs is not None
    assert graphs.runner.graphs.num_replays > 0
    assert graphs.runner.graphs.captured == at_start
    all_prompts = prompts + hit_prompts
    for name, outs in results.items():
        assert all(len(o) == MAX_NEW for o in outs), name
        gap = _max_gap(hd64_llama_dir, all_prompts, outs)
        assert gap <= BF16_TOL, f"{name}: chosen token {gap:.3f} below the fp32 argmax"
