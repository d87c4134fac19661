from __future__ import annotations

import dataclasses

import pytest
import torch

from kvmanager.config import PoolConfig
from kvmanager.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvmanager.hashing import make_hasher
from kvmanager.manager import KVCacheManager

BS = 4


def pool(num_blocks: int = 16, **kw: object) -> KVCacheManager:
    return KVCacheManager(PoolConfig(num_blocks=num_blocks, block_size=BS, **kw))  # type: ignore[arg-type]


def run_prompt(m: KVCacheManager, rid: str, tokens: list[int]) -> int:
    """Admit a whole prompt with prefix reuse and commit it; returns cached tokens."""
    hit = m.lookup_prefix(tokens)
    assert m.allocate_slots(rid, tokens, len(tokens) - hit.num_cached_tokens, hit) is not None
    m.commit(rid, tokens, len(tokens))
    return hit.num_cached_tokens


def test_prefix_reuse_shares_blocks_and_counts_hits() -> None:
    m = pool()
    a = list(range(10))
    assert run_prompt(m, "a", a) == 0
    b = [*a[:8], 77, 78, 79]
    assert run_prompt(m, "b", b) == 8  # two full shared blocks
    assert m.block_table("a")[:2] == m.block_table("b")[:2]
    assert m._ref_cnt[m.block_table("a")[0]] == 2
    s = m.stats()
    assert (s.prefix_hit_tokens, s.prefix_query_tokens) == (8, 21)
    m.check_integrity()


def test_full_hit_leaves_one_token_to_compute() -> None:
    m = pool()
    toks = list(range(8))  # exactly two blocks
    run_prompt(m, "a", toks)
    m.free("a")
    hit = m.lookup_prefix(toks)
    assert hit.num_cached_tokens == 4  # last block recomputed, its logits are needed


def test_freed_cached_blocks_stay_reusable_until_evicted() -> None:
    m = pool(num_blocks=4)
    run_prompt(m, "a", list(range(9)))  # 3 blocks, 2 full cached
    m.free("a")
    s = m.stats()
    assert (s.num_evictable_blocks, s.num_empty_blocks, s.num_free_blocks) == (2, 2, 4)
    assert m.lookup_prefix(list(range(9))).num_cached_tokens == 8
    # a 4-block request needs the cached blocks: they are evicted, BlockRemoved emitted
    m.take_events()
    assert m.allocate_slots("b", list(range(100, 116)), 16) is not None
    removed = [e for e in m.take_events() if isinstance(e, BlockRemoved)]
    assert sum(len(e.block_hashes) for e in removed) == 2
    assert m.lookup_prefix(list(range(9))).num_cached_tokens == 0
    m.check_integrity()


def test_backpressure_returns_none_and_changes_nothing() -> None:
    m = pool(num_blocks=4)
    assert m.allocate_slots("a", list(range(12)), 12) is not None
    m.commit("a", list(range(12)), 12)
    before = (m.stats(), m.block_table("a"))
    assert m.allocate_slots("b", list(range(8)), 8) is None
    assert not m.has_request("b")
    assert m.allocate_slots("a", list(range(20)), 8) is None  # growing past the pool
    assert (m.stats(), m.block_table("a")) == before
    m.check_integrity()


def test_decode_extends_in_place() -> None:
    m = pool(num_blocks=64)
    toks = list(range(6))
    m.allocate_slots("a", toks, 6, expected_num_tokens=30)
    for n in range(6, 30):
        m.commit("a", toks, n)
        toks.append(n)
        assert m.allocate_slots("a", toks, 1) is not None
    assert m.num_runs("a") == 1
    m.check_integrity()


def test_events_follow_vllm_semantics() -> None:
    m = pool()
    toks = list(range(13))
    run_prompt(m, "a", toks)
    (ev,) = m.take_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == make_hasher("fast").external_hashes(toks, BS)
    assert ev.parent_block_hash is None and ev.token_ids == toks[:12] and ev.block_size == BS
    # a continuation names its parent
    m.allocate_slots("a", [*toks, 1, 2, 3], 3)
    m.commit("a", [*toks, 1, 2, 3], 16)
    (ev2,) = m.take_events()
    assert isinstance(ev2, BlockStored) and ev2.parent_block_hash == ev.block_hashes[-1]
    assert sorted(m.cached_block_hashes()) == sorted(ev.block_hashes + ev2.block_hashes)
    m.free("a")
    assert m.reset_prefix_cache()
    assert isinstance(m.take_events()[-1], AllBlocksCleared)
    assert m.stats().num_cached_blocks == 0


def test_event_fields_match_vllm_structs() -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    for ours, theirs in [
        (BlockStored, kv_events.BlockStored),
        (BlockRemoved, kv_events.BlockRemoved),
    ]:
        ours_fields = {f.name for f in dataclasses.fields(ours)}
        assert ours_fields <= set(theirs.__struct_fields__)


def test_reset_refused_while_blocks_in_use() -> None:
    m = pool()
    run_prompt(m, "a", list(range(8)))
    assert not m.reset_prefix_cache()


def test_double_free_and_unknown_request_raise_and_leave_pool_intact() -> None:
    m = pool()
    run_prompt(m, "a", list(range(8)))
    m.free("a")
    snapshot = m.stats()
    with pytest.raises(KeyError, match="already freed"):
        m.free("a")
    with pytest.raises(KeyError):
        m.free("nope")
    assert m.stats() == snapshot
    m.check_integrity()


def test_invalid_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        PoolConfig(num_blocks=0)
    with pytest.raises(ValueError, match="allocator"):
        PoolConfig(num_blocks=4, allocator="worst_fit")
    m = pool()
    with pytest.raises(ValueError, match="num_new_tokens"):
        m.allocate_slots("a", [1], -1)
    m.allocate_slots("a", list(range(4)), 4)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        m.commit("a", list(range(4)), 9)
    with pytest.raises(ValueError, match="outside"):
        m.slot_mapping("a", 0, 5)
    with pytest.raises(ValueError, match="cache level"):
        m.observe_latency("disk", 1.0)


def test_slot_mapping_follows_block_table() -> None:
    m = pool()
    m.allocate_slots("a", list(range(6)), 6)
    table = m.block_table("a")
    assert m.slot_mapping("a", 3, 6) == [table[0] * BS + 3, table[1] * BS, table[1] * BS + 1]


@pytest.mark.parametrize("eviction", ["lru", "adaptive"])
def test_eviction_takes_chain_leaves_first(eviction: str) -> None:
    m = pool(num_blocks=6, eviction=eviction)
    toks = list(range(12))
    run_prompt(m, "a", [*toks, 0])  # 3 cached blocks + 1 partial
    m.free("a")
    m.take_events()
    assert m.allocate_slots("b", list(range(100, 116)), 16) is not None  # needs 1 eviction
    (ev,) = [e for e in m.take_events() if isinstance(e, BlockRemoved)]
    assert ev.block_hashes == [make_hasher("fast").external_hashes(toks, BS)[-1]]
    assert m.lookup_prefix([*toks, 0]).num_cached_tokens == 8  # the head survives


def test_adaptive_keeps_hot_prefix_that_lru_evicts() -> None:
    def hits_after_churn(eviction: str) -> int:
        m = pool(num_blocks=8, eviction=eviction, adaptive_half_life=64.0)
        hot = list(range(8))
        for i in range(5):  # the hot prefix is used often...
            run_prompt(m, f"h{i}", [*hot, 100 + i])
            m.free(f"h{i}")
        cold = list(range(500, 508))
        run_prompt(m, "c", [*cold, 1])  # ...then one newer, colder prefix
        m.free("c")
        run_prompt(m, "x", list(range(900, 921)))  # pressure: 6 blocks, 2 evictions needed
        m.free("x")
        return m.lookup_prefix([*hot, 1]).num_cached_tokens

    assert hits_after_churn("adaptive") == 8
    assert hits_after_churn("lru") == 0


def test_compaction_moves_data_and_rewrites_tables() -> None:
    m = pool(num_blocks=12)
    for i in range(4):
        run_prompt(m, f"r{i}", list(range(i * 100, i * 100 + 8)))
    m.free("r0")
    m.free("r2")
    m.reset_prefix_cache()  # refused: r1, r3 live; cached r0/r2 blocks remain evictable
    cache = torch.arange(12, dtype=torch.float32).repeat_interleave(BS * 2).view(12, BS, 1, 2)
    before = {rid: [cache[b].clone() for b in m.block_table(rid)] for rid in ("r1", "r3")}
    m.allocate_slots("z", list(range(4)), 4)
    m.free("z")  # leave a hole
    moves = m.plan_compaction()
    frontier = m.num_blocks - m.stats().num_empty_blocks
    assert all(s >= frontier > d for s, d in moves)
    m.apply_compaction(moves, [cache])
    m.check_integrity()
    s = m.stats()
    assert s.num_free_runs == 1 and s.external_fragmentation == 0.0
    for rid, rows in before.items():
        for b, row in zip(m.block_table(rid), rows, strict=True):
            assert torch.equal(cache[b], row)
    assert m.lookup_prefix([*range(100, 108), 5]).num_cached_tokens == 8
    assert m.plan_compaction() == []


def test_compaction_rejects_bad_moves() -> None:
    m = pool()
    m.allocate_slots("a", list(range(4)), 4)
    with pytest.raises(ValueError):
        m.apply_compaction([(m.block_table("a")[0], m.block_table("a")[0])])
    with pytest.raises(ValueError, match="destination"):
        m.apply_compaction([(5, 6)])  # 5 is empty


def test_stats_utilization_and_fragmentation() -> None:
    m = pool(num_blocks=16)
    m.allocate_slots("a", list(range(5)), 5)  # 2 blocks, 5 of 8 slots real once committed
    m.commit("a", list(range(5)), 5)
    assert m.stats().utilization == pytest.approx(5 / 8)
    for i in range(6):
        m.allocate_slots(f"f{i}", list(range(4)), 4)
    for i in (0, 2, 4):
        m.free(f"f{i}")
    s = m.stats()
    assert s.num_free_runs > 1 and 0 < s.external_fragmentation < 1
    assert s.f_spatial > 0 and s.f_total >= 0.5 * s.f_spatial
    m.check_integrity()


def test_vllm_hash_mode_pool_publishes_vllm_hashes() -> None:
    m = pool(hash_mode="vllm", hash_seed="vllm-none-hash")
    toks = list(range(8))
    run_prompt(m, "a", [*toks, 1])
    (ev,) = m.take_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == make_hasher("vllm", "vllm-none-hash").external_hashes(toks, BS)
    assert m.lookup_prefix([*toks, 2]).num_cached_tokens == 8


def test_prefix_caching_disabled() -> None:
    m = pool(enable_prefix_caching=False)
    run_prompt(m, "a", list(range(9)))
    m.free("a")
    assert m.lookup_prefix(list(range(9))).num_cached_tokens == 0
    assert m.take_events() == []
    assert m.stats().num_empty_blocks == 16


def test_commit_past_the_known_tokens_defers_their_blocks_hashes() -> None:
    """Asynchronous scheduling commits a step whose last token is still on the device: the
    block it fills is hashed only when a later commit brings that token."""
    m = pool()
    tokens = list(range(10, 17))  # 7 known tokens; the 8th is being sampled
    assert m.allocate_slots("a", tokens, 8) is not None
    m.commit("a", tokens, 8)
    assert m.num_computed_tokens("a") == 8
    assert len(m.cached_block_hashes()) == 1  # block 0 only: block 1 waits for token 8
    first = m.take_events()
    assert [len(e.block_hashes) for e in first if isinstance(e, BlockStored)] == [1]
    m.commit("a", [*tokens, 99], 8)  # the token arrives
    assert len(m.cached_block_hashes()) == 2
    (stored,) = m.take_events()
    assert isinstance(stored, BlockStored) and stored.token_ids == [14, 15, 16, 99]
    # The same chain as a synchronous commit of all 8 tokens.
    ref = pool()
    run_prompt(ref, "r", [*tokens, 99])
    assert sorted(ref.cached_block_hashes()) == sorted(m.cached_block_hashes())
    m.check_integrity()
