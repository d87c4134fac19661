"""Build everything the engine needs from a model argument: weights on the device, the
architecture description, the tokenizer (with its chat template) and the length limit."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from replicas.config import EngineConfig
from replicas.model import CausalLM
from replicas.model_config import ModelArchConfig, load_arch_config
from replicas.model_source import resolve_model_dir
from replicas.weights import load_weights

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    """The loaded model and its facts. ``tokenizer`` is None when the checkpoint has none
    (token-id-only serving: no text, no stop strings)."""

    model: CausalLM
    arch: ModelArchConfig
    tokenizer: Any
    model_dir: Path
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    load_seconds: float


def resolve_dtype(config: EngineConfig, arch: ModelArchConfig) -> torch.dtype:
    """'auto': float32 on CPU; the checkpoint's 16-bit dtype (else bfloat16) on CUDA."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if config.device == "cpu":
        return torch.float32
    return (
        _DTYPES.get(str(arch.torch_dtype), torch.bfloat16)
        if arch.torch_dtype
        in (
            "bfloat16",
            "float16",
        )
        else torch.bfloat16
    )


def _generation_eos(model_dir: Path) -> tuple[int, ...]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return ()
    value = json.loads(path.read_text()).get("eos_token_id")
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's HF tokenizer (chat template included), or None if it has none."""
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_model(config: EngineConfig) -> LoadedModel:
    """Resolve, build and load the model of ``config`` (ValueError on a bad model/limit)."""
    t0 = time.perf_counter()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    model_dir = resolve_model_dir(config.model)
    arch = load_arch_config(model_dir)
    eos = tuple(dict.fromkeys(arch.eos_token_ids + _generation_eos(model_dir)))
    arch = replace(arch, eos_token_ids=eos)
    limit = arch.max_position_embeddings
    if arch.sliding_window is not None:
        limit = min(limit, arch.sliding_window)
    max_model_len = config.max_model_len or limit
    if max_model_len > limit:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's limit {limit} "
            "(max_position_embeddings, capped at the sliding window)"
        )
    dtype = resolve_dtype(config, arch)
    device = torch.device(config.device)
    with torch.device("meta"):
        model = CausalLM(arch, max_model_len)
    # NOTE: build on meta, then materialise empty storage on the device: no random init cost.
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    # NOTE: the cos/sin tables are rebuilt in float32 (cast per use), as in transformers.
    model.model.rotary.build(device)
    load_weights(model, model_dir)
    model.eval()
    tokenizer = load_tokenizer(model_dir)
    return LoadedModel(
        model=model,
        arch=arch,
        tokenizer=tokenizer,
        model_dir=model_dir,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        load_seconds=time.perf_counter() - t0,
    )
