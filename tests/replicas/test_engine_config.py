"""EngineConfig: step sizes and step-loop modes default by device; explicit values and bad
input as given."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from replicas.config import DEVICE_DEFAULTS, EngineConfig


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unset_step_sizes_follow_the_device(device: str) -> None:
    for cfg in (EngineConfig(device=device), EngineConfig(device=device, max_num_seqs=None)):
        assert cfg.max_num_seqs == DEVICE_DEFAULTS[device]["max_num_seqs"]
        assert cfg.max_num_batched_tokens == DEVICE_DEFAULTS[device]["max_num_batched_tokens"]


def test_gpu_defaults_are_larger_than_cpu_ones() -> None:
    cpu, cuda = EngineConfig(), EngineConfig(device="cuda")
    assert cuda.max_num_batched_tokens > cpu.max_num_batched_tokens
    assert cuda.max_num_seqs > cpu.max_num_seqs


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unset_step_loop_modes_follow_the_device(device: str) -> None:
    cfg = EngineConfig(device=device, async_scheduling=None, engine_process=None)
    assert cfg.async_scheduling is (device == "cuda")
    assert cfg.engine_process is (device == "cuda")
    assert EngineConfig(device=device).model_dump() == cfg.model_dump()


def test_explicit_step_loop_modes_win() -> None:
    cfg = EngineConfig(device="cuda", async_scheduling=False, engine_process=False)
    assert (cfg.async_scheduling, cfg.engine_process) == (False, False)
    cfg = EngineConfig(async_scheduling=True, engine_process=True)
    assert (cfg.async_scheduling, cfg.engine_process) == (True, True)


def test_explicit_step_sizes_win() -> None:
    cfg = EngineConfig(device="cuda", max_num_seqs=8, max_num_batched_tokens=256)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == (8, 256)


def test_bad_step_sizes_are_refused() -> None:
    with pytest.raises(ValidationError):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValidationError):
        EngineConfig(device="cuda", max_num_batched_tokens=-1)
