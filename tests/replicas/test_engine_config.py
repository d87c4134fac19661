"""EngineConfig: step sizes default by device; explicit values and bad input as given."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from replicas.config import DEVICE_STEP_DEFAULTS, EngineConfig


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_unset_step_sizes_follow_the_device(device: str) -> None:
    for cfg in (EngineConfig(device=device), EngineConfig(device=device, max_num_seqs=None)):
        assert cfg.max_num_seqs == DEVICE_STEP_DEFAULTS[device]["max_num_seqs"]
        assert cfg.max_num_batched_tokens == DEVICE_STEP_DEFAULTS[device]["max_num_batched_tokens"]


def test_gpu_defaults_are_larger_than_cpu_ones() -> None:
    cpu, cuda = EngineConfig(), EngineConfig(device="cuda")
    assert cuda.max_num_batched_tokens > cpu.max_num_batched_tokens
    assert cuda.max_num_seqs > cpu.max_num_seqs


def test_explicit_step_sizes_win() -> None:
    cfg = EngineConfig(device="cuda", max_num_seqs=8, max_num_batched_tokens=256)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == (8, 256)


def test_bad_step_sizes_are_refused() -> None:
    with pytest.raises(ValidationError):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValidationError):
        EngineConfig(device="cuda", max_num_batched_tokens=-1)
