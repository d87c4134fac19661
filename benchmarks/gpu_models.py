"""Random-weight Llama shapes for the GPU benchmarks, and the two hardware ceilings.

    SHAPES["1b"]  16 layers, hidden 2048, 32/8 heads of 64, intermediate 8192, vocab 32000
    SHAPES["8b"]  Llama-3-8B: 32 layers, hidden 4096, 32/8 heads of 128, intermediate 14336,
                  vocab 128256

``random_checkpoint_dir`` writes only config.json; ``random_weights()`` patches the engine's
weight loader to fill every parameter in place on the GPU (normal(0, 0.02), norms at 1), so
an 8B engine starts in seconds with no 16 GB checkpoint on disk. Benchmarks that compare with
transformers write a real checkpoint instead (engine_gpu_bench.make_checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, int]] = {
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}


def hf_config_dict(shape: dict[str, int], max_positions: int) -> dict[str, Any]:
    return {
        **shape,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "eos_token_id": 1,
        "bos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def random_checkpoint_dir(shape: dict[str, int], max_positions: int) -> Path:
    """A model dir holding only config.json (use under ``random_weights()``)."""
    path = Path(tempfile.mkdtemp(prefix="tinyserve_random_"))
    (path / "config.json").write_text(json.dumps(hf_config_dict(shape, max_positions)))
    return path


@contextlib.contextmanager
def random_weights(seed: int = 0) -> Iterator[None]:
    """Within the block, the engine's loader fills parameters randomly instead of reading."""
    import replicas.model_loader as loader

    def fill(model: torch.nn.Module, _model_dir: object) -> None:
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)

    original = loader.load_weights
    loader.load_weights = fill  # type: ignore[assignment]
    try:
        yield
    finally:
        loader.load_weights = original


def param_bytes_and_flops(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every weight a decode step reads except the embedding table, matmul
    parameters: the FLOPs of one token's linear layers are 2x this)."""
    embed = model.model.embed_tokens.weight  # type: ignore[union-attr]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return total - embed.numel() * embed.element_size(), linear


def _median_event_ms(fn: Any, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth, bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _median_event_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (ms / 1e3)


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """bf16 matmul FLOP/s of an n x n x n product on random data (the measured peak)."""
    a = torch.randn((n, n), device="cuda", dtype=torch.bfloat16)
    b = torch.randn((n, n), device="cuda", dtype=torch.bfloat16)
    ms = _median_event_ms(lambda: a @ b, reps)
    return 2 * n**3 / (ms / 1e3)
