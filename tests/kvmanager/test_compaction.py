"""Contiguous compaction: move ordering (chains, cycles), gathering split tails with their
growth room, the whole-pool fallback, data and state moved together, no KV events."""

from __future__ import annotations

import pytest
import torch

from kvmanager.compaction import CompactionPlan, compose, order_moves
from kvmanager.config import PoolConfig
from kvmanager.eviction import make_eviction_policy
from kvmanager.manager import KVCacheManager

BS = 4


def pool(num_blocks: int, **kw: object) -> KVCacheManager:
    return KVCacheManager(PoolConfig(num_blocks=num_blocks, block_size=BS, **kw))  # type: ignore[arg-type]


def slot_cache(num_blocks: int) -> torch.Tensor:
    """One row per slot holding the token written there (-1 = nothing)."""
    return torch.full((num_blocks, BS), -1, dtype=torch.long)


def write(m: KVCacheManager, cache: torch.Tensor, rid: str, toks: list[int], start: int) -> None:
    for pos, slot in zip(range(start, len(toks)), m.slot_mapping(rid, start, len(toks)), strict=True):
        cache.view(-1)[slot] = toks[pos]


def grow(m: KVCacheManager, cache: torch.Tensor, rid: str, toks: list[int], n: int) -> list[int]:
    start = len(toks)
    toks += [7000 + len(toks) + i for i in range(n)]
    assert m.allocate_slots(rid, toks, n) is not None
    write(m, cache, rid, toks, start)
    m.commit(rid, toks, len(toks))
    return toks


def admit(m: KVCacheManager, cache: torch.Tensor, rid: str, toks: list[int], expected: int) -> None:
    hit = m.lookup_prefix(toks)
    n = len(toks) - hit.num_cached_tokens
    assert m.allocate_slots(rid, toks, n, hit, expected_num_tokens=expected) is not None
    write(m, cache, rid, toks, hit.num_cached_tokens)
    m.commit(rid, toks, len(toks))


def contents(m: KVCacheManager, cache: torch.Tensor, rid: str) -> list[int]:
    n = m.num_computed_tokens(rid)
    return cache.view(-1)[m.slot_mapping(rid, 0, n)].tolist()


def test_order_moves_runs_chains_and_breaks_cycles_through_an_empty_block() -> None:
    target = {1: 2, 2: 3, 3: 1, 5: 4, 6: 5}  # a 3-cycle and a chain ending in empty 4
    empty = {0, 4, 7}
    moves = order_moves(target, lambda b: b in empty, 8)
    full = set(range(8)) - empty
    for s, d in moves:  # sequentially valid: source full, destination empty
        assert s in full and d not in full
        full.remove(s)
        full.add(d)
    assert compose(moves) == target


def test_split_tail_is_gathered_with_its_room_and_the_data_moves() -> None:
    m, cache = pool(32), slot_cache(32)
    a = list(range(100, 108))
    admit(m, cache, "a", a, expected=8)  # no growth room: the next block lands elsewhere
    b = list(range(200, 208))
    admit(m, cache, "b", b, expected=40)
    a = grow(m, cache, "a", a, 6)
    assert m.num_runs("a") > 1 and m.num_split_allocations >= 1
    want_a, want_b = contents(m, cache, "a"), contents(m, cache, "b")
    stored = set(m.cached_block_hashes())
    m.take_events()
    plan = m.plan_contiguous_compaction()
    assert plan.moves and plan.num_blocks_moved <= len(m.block_table("a"))
    remap = m.apply_compaction(plan, [cache])
    m.check_integrity()
    assert m.num_runs("a") == 1 and remap
    assert contents(m, cache, "a") == want_a and contents(m, cache, "b") == want_b
    assert m.take_events() == [] and set(m.cached_block_hashes()) == stored
    assert m.stats().num_compactions == 1 and m.stats().num_compacted_blocks == len(remap)
    assert m.lookup_prefix([*a, 1]).num_cached_tokens == 12  # hashes follow their blocks


def test_split_growth_is_repaired_and_the_next_growth_extends_in_place() -> None:
    """A growth allocation that could not stay next to its request (the room was cut by later
    admissions) splits it; compaction gathers it with a room, and the next growth fits."""
    m, cache = pool(32), slot_cache(32)
    a = list(range(100, 108))
    admit(m, cache, "a", a, expected=64)  # room for 14 more blocks
    admit(m, cache, "b", list(range(200, 207)), expected=7)  # partial 2nd block: empty on free
    admit(m, cache, "c", list(range(300, 356)), expected=56)
    admit(m, cache, "d", list(range(400, 402)), expected=2)  # one partial block: cuts a's room
    admit(m, cache, "e", list(range(500, 548)), expected=48)  # cuts the rest of it
    m.free("b")
    m.free("d")  # its partial block is empty now: the compaction's spare block
    splits = m.num_split_allocations
    a = grow(m, cache, "a", a, 8)  # one block from what is left of its room, one elsewhere
    assert m.num_runs("a") == 2 and m.num_split_allocations == splits + 1
    want = contents(m, cache, "a")
    plan = m.plan_contiguous_compaction()
    assert "a" in plan.rooms
    m.apply_compaction(plan, [cache])
    m.check_integrity()
    assert m.num_runs("a") == 1 and contents(m, cache, "a") == want
    a = grow(m, cache, "a", a, 4)
    assert m.num_runs("a") == 1 and m.num_split_allocations == splits + 1
    assert contents(m, cache, "a") == a
    m.check_integrity()


def test_whole_pool_layout_when_no_window_is_free_of_other_requests() -> None:
    m, cache = pool(16), slot_cache(16)
    toks = {}
    for i, rid in enumerate("abcd"):
        toks[rid] = list(range(100 * i + 1, 100 * i + 5))
        admit(m, cache, rid, toks[rid], expected=4)  # one block each, packed: a b c d
    for rid in "abcd":  # each grows by one block, interleaved: a b c d a' b' c' d'
        toks[rid] = grow(m, cache, rid, toks[rid], 4)
    # fill the rest so no window of 2 free-of-others blocks remains outside a's blocks
    for i in range(8):
        admit(m, cache, f"f{i}", [9000 + 10 * i + j for j in range(4)], expected=4)
    m.free("f7")  # its block stays cached (full): no empty block, nothing can move
    assert not m.plan_contiguous_compaction()
    admit(m, cache, "g", [1, 2, 3], expected=3)  # takes f7's block, partial: empty when freed
    m.free("g")  # one empty block: the temp the layout's cycles go through
    want = {rid: contents(m, cache, rid) for rid in "abcd"}
    plan = m.plan_contiguous_compaction()
    m.apply_compaction(plan, [cache])
    m.check_integrity()
    for rid in "abcd":
        assert m.num_runs(rid) == 1 and contents(m, cache, rid) == want[rid]


def test_apply_validates_moves_in_order() -> None:
    m, cache = pool(8), slot_cache(8)
    admit(m, cache, "a", [1, 2, 3, 4, 5, 6, 7, 8], expected=8)
    a0, a1 = m.block_table("a")
    e = next(b for b in range(8) if b not in (a0, a1))
    with pytest.raises(ValueError, match="destination"):
        m.apply_compaction([(a0, e), (a1, e)])  # e is full after the first move
    m.check_integrity()
    e0, e1 = [
        b for b in range(8) if b not in (a0, a1)
    ][:2]
    m.apply_compaction(CompactionPlan([(a0, e0), (a1, e1), (e0, a0)]), [cache])  # a chain
    assert m.block_table("a") == [a0, e1] and contents(m, cache, "a") == [1, 2, 3, 4, 5, 6, 7, 8]
    m.check_integrity()


@pytest.mark.parametrize("name", ["lru", "adaptive"])
def test_eviction_order_survives_a_rename_with_cycles(name: str) -> None:
    p = make_eviction_policy(name, 512.0)
    for t, b in enumerate([3, 1, 2]):
        p.add(b, t)
        p.touch(b, t, 0)
    p.rename_many({3: 1, 1: 2, 2: 3})  # 3->1, 1->2, 2->3 at once
    assert [p.pop(lambda _b: True) for _ in range(3)] == [1, 2, 3]
