"""Helpers for engine tests: tiny random Llama / Qwen2 checkpoints written with transformers'
own ``save_pretrained`` (plus a word-level tokenizer), and a transformers greedy reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

VOCAB = 320
EOS_ID = 1
SPECIAL = ["<unk>", "</s>", "<s>"]


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for i in range(len(SPECIAL), VOCAB):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", bos_token="<s>"
    )
    fast.save_pretrained(str(path))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights and biases too, so loading them is actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def make_checkpoint(path: Path, family: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1234)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.08,
        eos_token_id=EOS_ID,
        bos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        cfg = LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000.0)
        model = Qwen2ForCausalLM(cfg)
    _perturb(model, seed=7)
    model = model.float().eval()
    model.save_pretrained(str(path))
    _save_tokenizer(path)
    return path


_HF_CACHE: dict[str, torch.nn.Module] = {}


def hf_greedy(model_dir: Path, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers ``generate`` (greedy, one prompt, no padding); output cut after EOS."""
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    model = _HF_CACHE[key]
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=0,
        )
    gen = [int(t) for t in out[0, ids.shape[1] :]]
    return gen[: gen.index(EOS_ID) + 1] if EOS_ID in gen else gen


def random_prompts(n: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
    """n prompts of the given lengths (cycled) over non-special token ids."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(len(SPECIAL), VOCAB, (lengths[i % len(lengths)],), generator=gen).tolist()
        for i in range(n)
    ]
