"""A tiny random checkpoint with the default model's real tokenizer and chat template.

The fault runs, the soak and their tests exercise the cluster (routing, retries, the pools'
bookkeeping), not the model: two decoder layers of width 64 with random weights make every
step a few milliseconds on CPU, so the app starts fast and a 2-core box can carry several
replicas, while prompts still tokenize exactly as SmolLM2's (same vocabulary, same template,
so block hashes and cache hits behave as in the real app). Output text is noise; runs pass
``ignore_eos`` where they need a fixed length.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def make_tiny_checkpoint(dest: Path, seed: int = 0) -> Path:
    """Write the checkpoint into ``dest`` (created) and return it. Resolves (and on first use
    converts) the default model only for its tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from replicas.model_source import resolve_model_dir

    source = resolve_model_dir("default")
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,  # NOTE: SmolLM2's, so its tokenizer's ids are all valid
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).float().eval().save_pretrained(str(dest))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    return dest
