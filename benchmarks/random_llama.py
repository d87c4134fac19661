"""A servable random-weight Llama checkpoint: a Llama shape (``LLAMA_1B``, ``LLAMA_8B``) with
random bf16 weights and a real tokenizer, written once to disk for the Serve-level benchmarks
(``gpu_ab``, ``serve_overhead``, ``structured_bench``). Routing and prefix caching act on token
ids; the weights only set the compute.

NOTE: the engine benchmarks fill random weights in place instead, with no checkpoint on disk
(``benchmarks.gpu_models.random_weights``); a served app loads its model from a directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.gpu_models import SHAPES

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64)


# NOTE: the engine benchmarks' 8B shape (benchmarks.gpu_models), less its vocabulary: a served
# checkpoint takes the real tokenizer's.
LLAMA_8B = {k: v for k, v in SHAPES["8b"].items() if k != "vocab_size"}


def make_llama1b(path: Path, tokenizer_dir: Path) -> Path:
    """A Llama-3.2-1B-shaped checkpoint with random bf16 weights and a real tokenizer (routing
    and prefix caching act on token ids; the weights only set the compute)."""
    return make_random_llama(path, tokenizer_dir, LLAMA_1B)


def make_random_llama(path: Path, tokenizer_dir: Path, shape: dict[str, int]) -> Path:
    """A Llama checkpoint of ``shape`` (LLAMA_1B, LLAMA_8B) with random bf16 weights and the
    tokenizer of ``tokenizer_dir``; reused when ``path`` already holds one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    tok = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = LlamaConfig(**shape, vocab_size=vocab, max_position_embeddings=32768,
                      rope_theta=500000.0, tie_word_embeddings=shape is LLAMA_1B,
                      bos_token_id=1, eos_token_id=2, pad_token_id=tok.get("pad_token_id"))
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    # NOTE: built in bf16 directly: an 8B model in fp32 first would need 32 GB more.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(str(path))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # NOTE: the driver keeps no cached GPU memory the replicas need.
    return path
