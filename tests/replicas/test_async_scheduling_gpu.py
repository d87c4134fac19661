"""Asynchronous scheduling on CUDA (``@pytest.mark.gpu``): the same tokens as the synchronous
engine, placeholder ids fed into CUDA-graph replays on the device, and no host sync while a
decode step is scheduled and launched (torch's sync debug mode raises on one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from replica_helpers import random_prompts
from test_engine_gpu import hd64_llama_dir  # noqa: F401  (fixture: CUDA decode kernel shapes)

from replicas.async_scheduling import AsyncStepper
from replicas.config import EngineConfig
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(model_dir: Path, dtype: str, async_on: bool) -> LLMEngine:
    config = EngineConfig(
        model=str(model_dir),
        device="cuda",
        dtype=dtype,
        num_blocks=256,
        block_size=16,
        max_model_len=256,
        async_scheduling=async_on,
    )
    return LLMEngine(config)


def _generate(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    return engine.generate(prompts, params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tokens_match_the_synchronous_engine_on_cuda(
    tiny_llama_dir: Path,
    hd64_llama_dir: Path,  # noqa: F811
    dtype: str,
) -> None:
    # NOTE: equal-length prompts added at once: both loops run the same batches (the same
    # graph buckets in bf16), so even bf16 must agree token for token.
    model_dir = tiny_llama_dir if dtype == "float32" else hd64_llama_dir
    prompts = random_prompts(6, [24] * 6, seed=11)
    mixed = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    ref = _engine(model_dir, dtype, False)
    eng = _engine(model_dir, dtype, True)
    assert _generate(eng, prompts, GREEDY) == _generate(ref, prompts, GREEDY)
    assert _generate(eng, prompts, mixed) == _generate(ref, prompts, mixed)
    if dtype == "bfloat16":
        assert eng.runner.graphs is not None and eng.runner.graphs.num_replays > 0
    eng.kv.check_integrity()


def test_launching_a_decode_step_never_waits_for_the_gpu(
    hd64_llama_dir: Path,  # noqa: F811
) -> None:
    eng = _engine(hd64_llama_dir, "bfloat16", True)
    assert eng.runner.graphs is not None
    stepper = eng._stepper
    assert isinstance(stepper, AsyncStepper) and not stepper.lane.worker_thread
    launch = stepper._launch
    checked = 0

    def strict_launch(sched: object) -> object:
        nonlocal checked
        # NOTE: decode steps only: a prefill step's host-side lengths are read on the host.
        if all(c.num_new_tokens == 1 for c in sched.chunks):  # type: ignore[attr-defined]
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(sched)  # type: ignore[arg-type]
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked += 1
        return launch(sched)  # type: ignore[arg-type]

    stepper._launch = strict_launch  # type: ignore[method-assign]
    outs = _generate(eng, random_prompts(4, [20, 33, 7, 50], seed=5), GREEDY)
    assert [len(o) for o in outs] == [12] * 4 and checked >= 10
