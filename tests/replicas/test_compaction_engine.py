"""Compaction in the engine (tiny random checkpoint, CPU): greedy outputs unchanged by a
compaction mid-generation, K/V and sparse page metadata moved with their blocks, the trigger,
the metrics counters; the CUDA kernel path (gpu marker) replays captured graphs after one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from replica_helpers import EOS_ID, VOCAB, random_prompts

from kvmanager.compaction import CompactionPlan
from replicas.compaction import Compactor
from replicas.config import CompactionConfig, EngineConfig
from replicas.engine_core_turn import check_idle
from replicas.llm_engine import LLMEngine
from replicas.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
OFF = {"enabled": False}


def engine(
    model_dir: Path, compaction: dict[str, object], num_blocks: int = 64, **kw: object
) -> LLMEngine:
    args: dict[str, object] = {"block_size": 4, **kw}
    return LLMEngine(
        EngineConfig(
            model=str(model_dir), num_blocks=num_blocks, max_num_batched_tokens=64,
            compaction=compaction, **args,  # type: ignore[arg-type]
        )
    )  # fmt: skip


def run(e: LLMEngine, prompts: list[list[int]], compact_at: int | None = None) -> list[list[int]]:
    """Generate greedily; at step ``compact_at`` force a pack compaction (every block that
    sits above a hole moves: the most disruptive plan the pool can make)."""
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        e.add_request(rid, p, GREEDY)
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    steps = 0
    while e.has_unfinished_requests():
        if steps == compact_at:
            moves = e.kv.plan_compaction()
            assert moves, "the test needs a plan that moves blocks"
            before = [t.clone() for t in _meta(e)]
            remap = e.compactor.compact(CompactionPlan(moves))
            assert remap == len(moves)
            for old, new in moves:  # page metadata rows moved with their blocks
                for b, a in zip(before, _meta(e), strict=True):
                    assert torch.equal(a[new], b[old])
            e.kv.check_integrity()
        for o in e.step():
            out[o.request_id] += o.new_token_ids
        steps += 1
    return [out[rid] for rid in ids]


def _meta(e: LLMEngine) -> list[torch.Tensor]:
    return [] if e.runner.sparse is None else e.runner.sparse.metadata_tensors()


def test_greedy_output_is_unchanged_by_a_compaction_mid_generation(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(5, [9, 22, 5, 31, 14], seed=3)
    want = run(engine(tiny_llama_dir, OFF), prompts)
    got = run(engine(tiny_llama_dir, OFF), prompts, compact_at=6)
    assert got == want and all(len(o) == GREEDY.max_tokens for o in want)


def test_sparse_metadata_moves_with_its_blocks(tiny_llama_dir: Path) -> None:
    sparse = {"token_budget": 32, "dense_layers": 1}  # 8 pages of 4 tokens: decode is sparse
    prompts = random_prompts(3, [60, 45, 52], seed=4)
    want = run(engine(tiny_llama_dir, OFF, sparse_attention=sparse), prompts)
    e = engine(tiny_llama_dir, OFF, sparse_attention=sparse)
    got = run(e, prompts, compact_at=3)  # run() checks the metadata rows moved
    assert e.runner.sparse is not None and e.runner.sparse.stats().num_sparse_decode_calls_total
    assert got == want


@pytest.mark.parametrize(
    ("num_blocks", "full_layout_after"),
    [(48, 16), (64, 1)],  # split tails moved into windows / the whole pool laid out
)
def test_engine_compacts_on_split_allocations_and_outputs_match(
    tiny_llama_dir: Path, num_blocks: int, full_layout_after: int
) -> None:
    """A pool too small for every request's expected length: growth rooms are cut, decode
    splits sequences, the engine compacts between steps (verify=True checks integrity after
    each one), and the greedy outputs equal those of an engine that never compacts."""
    prompts = random_prompts(8, [13, 27, 6, 40, 18, 9, 33, 21], seed=11)
    off = engine(tiny_llama_dir, OFF, num_blocks)
    on = engine(tiny_llama_dir, {"verify": True, "full_layout_after": full_layout_after}, num_blocks)
    assert run(on, prompts) == run(off, prompts)
    assert off.kv.num_split_allocations > 0 and off.compactor.stats.num_compactions_total == 0
    s = on.compactor.stats
    assert s.num_compactions_total > 0 and s.num_blocks_moved_total > 0
    assert on.stats().num_compactions == s.num_compactions_total
    assert on.stats().num_compacted_blocks == s.num_blocks_moved_total
    assert on.take_events() and not any(
        type(ev).__name__ == "AllBlocksCleared" for ev in on.take_events()
    )


def test_async_scheduling_drains_before_it_compacts(tiny_llama_dir: Path) -> None:
    """With asynchronous scheduling a step is always in flight while decoding: the engine
    resolves it before compacting, and the outputs equal the synchronous engine's."""
    prompts = random_prompts(8, [13, 27, 6, 40, 18, 9, 33, 21], seed=11)
    want = run(engine(tiny_llama_dir, OFF, 48), prompts)
    on = engine(tiny_llama_dir, {"verify": True}, 48, async_scheduling=True)
    in_flight: list[bool] = []
    compact = on.compactor.compact

    def watched(plan: CompactionPlan | None = None) -> int:
        in_flight.append(on._stepper is not None and on._stepper.in_flight)
        return compact(plan)

    on.compactor.compact = watched  # type: ignore[method-assign]
    assert run(on, prompts) == want
    assert in_flight and not any(in_flight)
    assert on.compactor.stats.num_compactions_total > 0


def test_idle_compaction_waits_for_the_idle_check(tiny_llama_dir: Path) -> None:
    """``when='idle'`` (the CUDA default): the same splitting workload runs without a single
    compaction between steps, outputs equal; the engine core's idle check then takes the
    due trigger (and leaves the pool intact)."""
    prompts = random_prompts(8, [13, 27, 6, 40, 18, 9, 33, 21], seed=11)
    want = run(engine(tiny_llama_dir, OFF, 48), prompts)
    e = engine(tiny_llama_dir, {"verify": True, "when": "idle", "full_layout_after": 1}, 48)
    assert not e.compactor.between_steps
    assert run(e, prompts) == want
    assert e.kv.num_split_allocations > 0 and e.compactor.stats.num_compactions_total == 0
    assert e.compactor.should_compact()
    check_idle(e)
    assert not e.compactor.should_compact()  # the trigger was taken at idle
    e.kv.check_integrity()


def test_compaction_place_defaults_by_device(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir, {})
    assert e.compactor.between_steps  # CPU: between steps
    cuda_runner = SimpleNamespace(device=torch.device("cuda"))
    c = Compactor(e.kv, cuda_runner, CompactionConfig())  # type: ignore[arg-type]
    assert not c.between_steps and not c.maybe_compact()
    pinned = Compactor(e.kv, cuda_runner, CompactionConfig(when="between_steps"))  # type: ignore[arg-type]
    assert pinned.between_steps


def test_trigger_threshold_and_interval(tiny_llama_dir: Path) -> None:
    e = engine(tiny_llama_dir, {"min_split_allocations": 2, "min_interval_steps": 3})
    c: Compactor = e.compactor
    compacted: list[int] = []
    c.compact = lambda plan=None: compacted.append(c._num_steps) or 0  # type: ignore[method-assign]
    e.kv._num_split_allocations = 1
    assert not c.maybe_compact() and not c.maybe_compact() and not c.maybe_compact()
    e.kv._num_split_allocations = 2  # threshold reached, 3 steps since start
    assert c.maybe_compact() and compacted == [4]
    with pytest.raises(ValidationError):
        CompactionConfig(min_split_allocations=0)
    with pytest.raises(ValidationError):
        CompactionConfig(min_interval_steps=0)


def test_compaction_counters_advance_by_delta() -> None:
    from replicas.deployment_metrics import ReplicaMetrics

    incs: list[tuple[str, int]] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, value: int) -> None:
            incs.append((self.name, value))

    m = object.__new__(ReplicaMetrics)  # NOTE: no Ray here; only the counters are exercised
    m.compactions, m.compacted_blocks = Recorder("c"), Recorder("b")
    m._compaction_seen = (0, 0)
    m.on_compaction(1, 40)
    m.on_compaction(1, 40)
    m.on_compaction(3, 70)
    assert incs == [("c", 1), ("b", 40), ("c", 2), ("b", 30)]


def _hd64_llama(path: Path) -> Path:
    """A tiny random Llama with head_dim 64: the shapes the CUDA decode kernel instantiates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4321)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=EOS_ID, bos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(cfg).float().eval().save_pretrained(str(path))
    return path


@pytest.mark.gpu
def test_kernel_path_and_captured_graphs_after_compaction(tmp_path: Path) -> None:
    """CUDA, bf16: the batched block-copy kernel moves K/V, the graphs' persistent tables are
    remapped, and greedy outputs equal an identical engine that never compacts (same kernels,
    same reduction order: block ids do not enter the arithmetic). NOT run on CPU CI."""
    model_dir = _hd64_llama(tmp_path / "hd64")
    prompts = random_prompts(5, [9, 40, 5, 70, 23], seed=3)
    # NOTE: synchronous: run() forces a compaction between step() calls itself, which
    # must find no step in flight (the engine's own trigger drains the async loop first)
    kw = {"device": "cuda", "dtype": "bfloat16", "cuda_graphs": True, "block_size": 16,
          "async_scheduling": False}  # fmt: skip
    want = run(engine(model_dir, OFF, 128, **kw), prompts)
    e = engine(model_dir, OFF, 128, **kw)
    assert e.runner.graphs is not None
    assert run(e, prompts, compact_at=4) == want and e.runner.graphs.num_replays > 0
