"""KVIndex: longest exact prefix per replica, tiers, pending TTL, membership."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from index_reference import KVIndex as RefIndex
from selector_helpers import FakeClock

from cluster.selector.index import KVIndex
from kvmanager.events import MEDIUM_CPU


def _index(num_slots: int) -> tuple[KVIndex, FakeClock]:
    clock = FakeClock(0.0)
    idx = KVIndex(clock)
    for s in range(num_slots):
        idx.add_slot(s)
    return idx, clock


def test_longest_prefix_per_slot() -> None:
    idx, _ = _index(3)
    chain = [11, 12, 13, 14, 15]
    idx.store(0, chain[:3])
    idx.store(1, chain)
    idx.store(2, [12, 13, 14])  # holds later blocks but not the first: no prefix
    m = idx.match(chain, 0b111)
    assert m.resident == {0: 3, 1: 5}
    assert m.pending == {}
    # only slots in the mask are reported
    assert idx.match(chain, 0b001).resident == {0: 3}


def test_hole_in_chain_stops_the_prefix() -> None:
    idx, _ = _index(1)
    idx.store(0, [1, 2, 3, 4])
    idx.remove(0, [2])
    assert idx.match([1, 2, 3, 4], 1).resident == {0: 1}


def test_remove_and_clear_only_touch_their_slot() -> None:
    idx, _ = _index(2)
    idx.store(0, [1, 2])
    idx.store(1, [1, 2])
    idx.clear(0)
    assert idx.match([1, 2], 0b11).resident == {1: 2}
    assert idx.num_resident(0) == 0 and idx.num_resident(1) == 2
    idx.remove(1, [2, 999])  # unknown hash ignored
    assert idx.match([1, 2], 0b11).resident == {1: 1}


def test_host_tier_counts_and_survives_gpu_removal() -> None:
    idx, _ = _index(1)
    idx.store(0, [1, 2, 3])
    idx.store(0, [2, 3], MEDIUM_CPU)
    idx.remove(0, [3])  # evicted from GPU, still on host
    m = idx.match([1, 2, 3], 1)
    assert m.resident == {0: 3}
    assert m.host == {0: 1}
    idx.remove(0, [3], MEDIUM_CPU)
    assert idx.match([1, 2, 3], 1).resident == {0: 2}


def test_pending_extends_match_until_ttl() -> None:
    idx, clock = _index(2)
    idx.store(0, [1])
    idx.mark_pending(0, [1, 2, 3], ttl_s=2.0)
    idx.mark_pending(1, [1, 2], ttl_s=5.0)
    m = idx.match([1, 2, 3], 0b11)
    assert m.resident == {0: 1}
    assert m.pending == {0: 2, 1: 2}
    clock.t = 3.0
    assert idx.expire_pending() == 3
    assert idx.match([1, 2, 3], 0b11).pending == {1: 2}
    clock.t = 6.0
    idx.expire_pending()
    assert idx.match([1, 2, 3], 0b11).pending == {}
    assert idx.num_pending(0) == idx.num_pending(1) == 0


def test_pending_continues_a_resident_prefix_mid_walk() -> None:
    """The walk probes the pending table only where a live candidate's resident mask stops:
    a slot resident for 3 blocks and pending after, beside one resident for all 6 (whose
    masks cover the walk until block 3), and a third slot pending from block 0."""
    idx, _ = _index(3)
    chain = [21, 22, 23, 24, 25, 26]
    idx.store(0, chain[:3])
    idx.mark_pending(0, chain[3:5], ttl_s=1.0)
    idx.store(1, chain)
    idx.mark_pending(2, chain[:2], ttl_s=1.0)
    m = idx.match(chain, 0b111)
    assert m.resident == {0: 3, 1: 6}
    assert m.pending == {0: 2, 2: 2}


def test_repeated_pending_mark_extends_deadline() -> None:
    idx, clock = _index(1)
    idx.mark_pending(0, [7], ttl_s=1.0)
    clock.t = 0.5
    idx.mark_pending(0, [7], ttl_s=1.0)  # now due at 1.5
    clock.t = 1.2
    idx.expire_pending()
    assert idx.match([7], 1).pending == {0: 1}


def test_remove_slot_then_reuse_starts_empty() -> None:
    idx, _ = _index(2)
    idx.store(1, [5, 6])
    idx.mark_pending(1, [5, 6, 7], 10.0)
    idx.remove_slot(1)
    assert idx.num_unique_blocks == 0
    idx.add_slot(1)
    m = idx.match([5, 6, 7], 0b11)
    assert m.resident == {} and m.pending == {}


def test_replace_is_exact() -> None:
    idx, _ = _index(1)
    idx.store(0, [1, 2, 3])
    idx.replace(0, [9, 8], [7])
    assert idx.num_resident(0) == 3
    assert not idx.holds(0, 1)
    assert idx.holds(0, 9) and idx.holds(0, 7)


ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "remove", "clear"]),
        st.integers(0, 4),
        st.lists(st.integers(0, 12), max_size=6),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, query=st.lists(st.integers(0, 12), max_size=8))
def test_matches_naive_reference(ops: list[tuple[str, int, list[int]]], query: list[int]) -> None:
    idx, _ = _index(5)
    ref: list[set[int]] = [set() for _ in range(5)]
    for op, slot, hashes in ops:
        if op == "store":
            idx.store(slot, hashes)
            ref[slot].update(hashes)
        elif op == "remove":
            idx.remove(slot, hashes)
            ref[slot].difference_update(hashes)
        else:
            idx.clear(slot)
            ref[slot].clear()
    expected = {}
    for slot in range(5):
        n = 0
        while n < len(query) and query[n] in ref[slot]:
            n += 1
        if n:
            expected[slot] = n
    assert idx.match(query, 0b11111).resident == expected
    assert idx.num_unique_blocks == len(set().union(*ref))


@settings(max_examples=100, deadline=None)
@given(
    resident=st.lists(st.lists(st.integers(0, 9), max_size=6), min_size=3, max_size=3),
    pending=st.lists(st.lists(st.integers(0, 9), max_size=6), min_size=3, max_size=3),
    query=st.lists(st.integers(0, 9), min_size=1, max_size=8),
)
def test_pending_walk_matches_reference(
    resident: list[list[int]], pending: list[list[int]], query: list[int]
) -> None:
    idx, _ = _index(3)
    for slot in range(3):
        idx.store(slot, resident[slot])
        idx.mark_pending(slot, pending[slot], ttl_s=10.0)

    def prefix(held: set[int]) -> int:
        n = 0
        while n < len(query) and query[n] in held:
            n += 1
        return n

    m = idx.match(query, 0b111)
    for slot in range(3):
        res = prefix(set(resident[slot]))
        both = prefix(set(resident[slot]) | set(pending[slot]))
        assert m.resident.get(slot, 0) == res
        assert m.pending.get(slot, 0) == both - res
    r_arr, p_arr, _ = m.arrays(3)
    assert r_arr.tolist() == [m.resident.get(s, 0) for s in range(3)]
    assert p_arr.tolist() == [m.pending.get(s, 0) for s in range(3)]


# NOTE: slots across three 64-bit mask words; hashes include 64-bit unsigned values (>= 2^63),
# which the index folds to int64 and must still tell apart from small ones.
_SLOTS = [0, 1, 63, 64, 130]
_HASHES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, -5, 2**63 + 1, 2**64 - 1])
_ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["store", "store_cpu", "remove", "remove_cpu", "clear", "pending", "tick", "reslot"]
        ),
        st.sampled_from(_SLOTS),
        st.lists(_HASHES, max_size=6),
    ),
    max_size=50,
)


def _apply(idx: KVIndex | RefIndex, op: str, slot: int, hashes: list[int]) -> None:
    if op == "store":
        idx.store(slot, hashes)
    elif op == "store_cpu":
        idx.store(slot, hashes, MEDIUM_CPU)
    elif op == "remove":
        idx.remove(slot, hashes)
    elif op == "remove_cpu":
        idx.remove(slot, hashes, MEDIUM_CPU)
    elif op == "clear":
        idx.clear(slot)
    elif op == "pending":
        idx.mark_pending(slot, hashes, ttl_s=1.0 + len(hashes) % 3)
    elif op == "reslot":
        idx.remove_slot(slot)
        idx.add_slot(slot)
    else:
        idx.expire_pending(max_marks=len(hashes) or None)


def _fold(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


@settings(max_examples=300, deadline=None)
@given(ops=_ops, queries=st.lists(st.lists(_HASHES, max_size=8), min_size=1, max_size=4))
def test_equivalent_to_the_dict_index(
    ops: list[tuple[str, int, list[int]]], queries: list[list[int]]
) -> None:
    """The compiled index gives the previous dict-of-ints index's answers on any history:
    prefixes (resident, pending, host-only), counts, membership."""
    clock = FakeClock(0.0)
    new, ref = KVIndex(clock), RefIndex(clock)
    for s in _SLOTS:
        new.add_slot(s)
        ref.add_slot(s)
    # NOTE: the reference keys hashes as given; feed it the folded (int64) values, which the
    # new index treats as the same block.
    for op, slot, hashes in ops:
        _apply(new, op, slot, hashes)
        _apply(ref, op, slot, [_fold(h) for h in hashes])
        if op == "tick":
            clock.t += 0.7
    mask = sum(1 << s for s in _SLOTS)
    for q in queries:
        got, want = new.match(q, mask), ref.match([_fold(h) for h in q], mask)
        assert got.resident == want.resident
        assert got.pending == want.pending
        assert got.host == want.host
        sub = new.match(q, new.slots_mask([1, 64]))
        assert sub.resident == ref.match([_fold(h) for h in q], (1 << 1) | (1 << 64)).resident
    for s in _SLOTS:
        assert new.num_resident(s) == ref.num_resident(s)
        assert new.num_pending(s) == ref.num_pending(s)
        for h in (0, 3, 2**64 - 1):
            assert new.holds(s, h) == ref.holds(s, _fold(h))
    assert new.num_unique_blocks == ref.num_unique_blocks
    assert new.expire_pending() == ref.expire_pending()


def test_table_grows_and_reuses_tombstones() -> None:
    """Thousands of stores and removes through rehashes keep every answer exact."""
    idx, _ = _index(2)
    chain = list(range(1, 5001))
    idx.store(0, chain)
    idx.remove(0, chain[2500:])
    idx.store(1, chain[:100])
    idx.store(0, chain[2500:4000])
    assert idx.match(chain, 0b11).resident == {0: 4000, 1: 100}
    assert idx.num_resident(0) == 4000 and idx.num_unique_blocks == 4000
    idx.clear(0)
    assert idx.num_unique_blocks == 100 and idx.match(chain, 0b11).resident == {1: 100}


def test_many_pending_marks_through_rehashes_match_the_reference() -> None:
    clock = FakeClock(0.0)
    new, ref = KVIndex(clock), RefIndex(clock)
    for idx in (new, ref):
        for s in (0, 70):
            idx.add_slot(s)
    for i in range(300):
        hashes = list(range(i * 7, i * 7 + 20))  # overlapping marks: later deadlines win
        for idx in (new, ref):
            idx.mark_pending((0, 70)[i % 2], hashes, ttl_s=1.0 + (i % 5))
        clock.t += 0.01
        if i % 50 == 49:
            assert new.expire_pending(max_marks=20) == ref.expire_pending(max_marks=20)
    for s in (0, 70):
        assert new.num_pending(s) == ref.num_pending(s) > 0
    q = list(range(0, 2200))
    assert new.match(q, (1 << 0) | (1 << 70)).pending == ref.match(q, (1 << 0) | (1 << 70)).pending
    clock.t += 3.0
    assert new.expire_pending() == ref.expire_pending()
    new.remove_slot(70)
    ref.remove_slot(70)
    assert new.num_pending(70) == 0 and new.num_pending(0) == ref.num_pending(0)
    clock.t += 10.0
    assert new.expire_pending() == ref.expire_pending()
    assert new.match(q, 1).pending == {} == ref.match(q, 1).pending
