"""Engine-side sparse decode: metadata kept current, dense layers untouched, exact when the
budget covers the context, counters, config validation (tiny random model, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from replicas.attention import AttentionMetadata
from replicas.config import EngineConfig, SparseAttentionConfig
from replicas.model import CausalLM
from replicas.model_config import ModelArchConfig, RopeConfig
from replicas.sparse import attach_sparse_attention

BS = 16


def _model() -> CausalLM:
    cfg = ModelArchConfig(
        family="llama", vocab_size=97, hidden_size=64, intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=4, num_kv_heads=2, head_dim=16,
        rms_norm_eps=1e-5, max_position_embeddings=1024, rope=RopeConfig(), qkv_bias=False,
        o_bias=False, mlp_bias=False, tie_word_embeddings=False, sliding_window=None,
        eos_token_ids=(1,), torch_dtype=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return CausalLM(cfg, 1024).eval()


def _run(model: CausalLM, caches, ids: list[int], start: int, table: list[int]) -> torch.Tensor:
    """One sequence: tokens ids at positions start.. (prefill if > 1 token, else decode)."""
    n, end = len(ids), start + len(ids)
    slots = [table[p // BS] * BS + p % BS for p in range(start, end)]
    bt = torch.tensor([table], dtype=torch.int32)
    lens = torch.tensor([end], dtype=torch.int32)
    decode = n == 1
    empty_bt = torch.zeros((0, 1), dtype=torch.int32)
    empty = torch.zeros(0, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=1 if decode else 0,
        decode_block_tables=bt if decode else empty_bt,
        decode_seq_lens=lens if decode else empty,
        prefill_cu_seqlens_q=torch.tensor([0] if decode else [0, n], dtype=torch.int32),
        prefill_seq_lens=empty if decode else lens,
        prefill_block_tables=empty_bt if decode else bt,
        num_prefill_tokens=0 if decode else n,
    )
    pos = torch.arange(start, end)
    return model(torch.tensor(ids), pos, caches, meta, torch.tensor([n - 1]))


def _generate(budget: int | None, steps: int = 6) -> tuple[list[torch.Tensor], object, list]:
    model = _model()
    num_blocks = 40
    shape = (num_blocks, BS, 2, 16)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(3)]
    sparse = None
    if budget is not None:
        cfg = SparseAttentionConfig(token_budget=budget, dense_layers=1)
        sparse = attach_sparse_attention(model, cfg, num_blocks, BS)
    table = list(range(39, 39 - 16, -1))  # NOTE: descending block_ids, not the identity
    prompt = torch.randint(3, 97, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = [_run(model, caches, prompt, 0, table)]
    tokens = prompt
    for _ in range(steps):
        nxt = int(logits[-1].argmax())
        logits.append(_run(model, caches, [nxt], len(tokens), table))
        tokens = [*tokens, nxt]
        if sparse is not None:  # NOTE: ModelRunner.execute does this for the engine
            sparse.count_step([len(tokens)], len(table))
    return logits, sparse, [caches, table, len(tokens)]


def test_budget_covering_context_matches_dense_and_metadata_tracks_keys() -> None:
    dense, _, _ = _generate(None)
    same, sparse, (caches, table, n) = _generate(512)
    for a, b in zip(dense, same, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert sparse is not None and sorted(sparse.layers) == [1, 2]
    assert sparse.stats().num_sparse_decode_calls_total == 0  # fits the budget: dense path
    for i, layer in sparse.layers.items():
        k_cache = caches[i][0]
        for p in range(math.ceil(n / BS)):
            rows = k_cache[table[p], : min(BS, n - p * BS)]
            assert torch.equal(layer.k_min[table[p]], rows.amin(0))
            assert torch.equal(layer.k_max[table[p]], rows.amax(0))
    assert sparse.metadata_bytes_per_block() == 2 * 2 * (2 * 16) * 4


def test_small_budget_is_sparse_and_counts_pages() -> None:
    dense, _, _ = _generate(None, steps=3)
    sparse_logits, sparse, (_, _, n) = _generate(64, steps=3)
    torch.testing.assert_close(dense[0], sparse_logits[0])  # prefill stays dense
    assert not torch.allclose(dense[1], sparse_logits[1], atol=1e-4)
    st = sparse.stats()
    assert st.num_sparse_decode_calls_total == 3 * 2  # 3 steps x 2 sparse layers
    pages = [math.ceil((n - 2 + i) / BS) for i in range(3)]  # context of each step
    assert st.num_pages_scored_total == sum(pages) * 2 * 2
    assert st.num_pages_selected_total == 3 * 2 * 2 * (64 // BS)


def test_config_option_validates() -> None:
    cfg = EngineConfig(sparse_attention={"token_budget": 1024, "dense_layers": 0})
    assert cfg.sparse_attention == SparseAttentionConfig(token_budget=1024, dense_layers=0)
    assert EngineConfig().sparse_attention is None
    with pytest.raises(ValidationError):
        EngineConfig(sparse_attention={"token_budget": 8})
    with pytest.raises(ValueError, match="two blocks"):
        attach_sparse_attention(_model(), SparseAttentionConfig(token_budget=32), 4, 32)


def test_engine_option_runs_sparse_and_prefix_hits_reuse_page_metadata(
    tiny_llama_dir: Path,
) -> None:
    from replica_helpers import random_prompts

    from replicas.llm_engine import LLMEngine
    from replicas.sampling_params import SamplingParams

    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = random_prompts(2, [70, 45], seed=5)
    sparse_cfg = {"token_budget": 32, "dense_layers": 1}  # 8 pages of 4 tokens
    engine = LLMEngine(
        EngineConfig(model=str(tiny_llama_dir), num_blocks=96, block_size=4,
                     sparse_attention=sparse_cfg)
    )  # fmt: skip
    assert engine.runner.sparse is not None
    first = engine.generate(prompts, greedy)
    calls = engine.runner.sparse.stats().num_sparse_decode_calls_total
    assert calls > 0 and all(len(o) == 6 for o in first)
    # NOTE: the second pass hits the cached prompt blocks; their page metadata must still
    # describe them, so the sparse selections and hence the tokens repeat exactly.
    again = engine.generate(prompts, greedy)
    assert again == first
    assert engine.stats().num_used_blocks == 0


def test_pool_sizing_counts_page_metadata() -> None:
    """With sparse attention the CPU KV budget also pays for per-block key min/max."""
    from types import SimpleNamespace

    from replicas.llm_engine import derive_num_blocks

    cfg = SimpleNamespace(num_hidden_layers=4, num_kv_heads=2, head_dim=8)
    loaded = SimpleNamespace(
        model=SimpleNamespace(config=cfg), dtype=torch.float32, device=torch.device("cpu")
    )
    base = dict(model="unused", block_size=16, cpu_kv_cache_gib=1 / 1024)
    dense = derive_num_blocks(EngineConfig(**base), loaded)  # type: ignore[arg-type]
    sparse_cfg = SparseAttentionConfig(token_budget=64, dense_layers=2)
    sparse = derive_num_blocks(EngineConfig(**base, sparse_attention=sparse_cfg), loaded)  # type: ignore[arg-type]
    kv = 2 * 4 * 16 * 2 * 8 * 4  # K+V bytes per block
    meta = 2 * 2 * 2 * 8 * 4  # min+max for the 2 sparse layers
    assert (dense, sparse) == ((1 << 20) // kv, (1 << 20) // (kv + meta))


def test_sparse_page_counters_advance_by_delta() -> None:
    from replicas.deployment_metrics import ReplicaMetrics
    from replicas.sparse import SparseAttentionStats

    incs: list[tuple[int, str]] = []

    class Recorder:
        def inc(self, value: int, tags: dict[str, str]) -> None:
            incs.append((value, tags["kind"]))

    m = object.__new__(ReplicaMetrics)  # NOTE: no Ray here; only the counter is exercised
    m.sparse_pages = Recorder()
    m._sparse_seen = (0, 0)
    m.on_sparse(SparseAttentionStats(1, 40, 10))
    m.on_sparse(SparseAttentionStats(1, 40, 10))
    m.on_sparse(SparseAttentionStats(3, 100, 25))
    assert incs == [(40, "scored"), (10, "selected"), (60, "scored"), (15, "selected")]
