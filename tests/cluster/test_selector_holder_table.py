"""HolderTable, the resident tiers' 16-byte rows: inline slot ids, the overflow pool for blocks
held by 4+ slots, and the transitions between them, through colliding backward-shift deletes.

Tiny tables (8 rows) with keys sharing home rows at the table's end, so probe runs collide and
wrap around row 0; every history is checked against a dict of sets.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from index_reference import KVIndex as RefIndex
from selector_helpers import FakeClock
from slot_reference import apply_op, check_holder_table, keys_homed_at

from cluster.selector import holder_kernels as hk
from cluster.selector.holder_table import HolderTable
from cluster.selector.index import KVIndex

_SLOTS = [0, 1, 2, 3, 63, 64, 130]
_OVER_BIT = np.uint64(1 << 63)


_KEYS = keys_homed_at((6, 7, 0), 3, 2)


def _check(t: HolderTable, ref: dict[int, set[int]]) -> None:
    check_holder_table(t, ref, _KEYS, _SLOTS)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "set", "clear", "clear_slot"]),
        st.sampled_from(_SLOTS),
        st.lists(st.sampled_from(_KEYS), max_size=4),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_holder_table_equals_a_dict_through_overflow_and_colliding_deletes(
    ops: list[tuple[str, int, list[int]]],
) -> None:
    t = HolderTable(num_words=3, bits=3, overflow_rows=1)
    ref: dict[int, set[int]] = {}
    for op, slot, keys in ops:
        arr = np.asarray(keys, np.uint64)
        want = apply_op(ref, op, slot, keys)
        if op == "set":
            assert t.set_slot(arr, slot) == want
        elif op == "clear":
            assert t.clear_slot_of(arr, slot) == want
        else:
            t.clear_slot(slot)
        _check(t, ref)


def _row(t: HolderTable, key: int) -> np.uint64:
    return t.tab[hk.find(t.tab, t.bits, np.uint64(key)), 1]


def test_a_fourth_holder_moves_a_block_to_overflow_and_a_third_moves_it_back() -> None:
    t = HolderTable(num_words=4)
    key = np.asarray([12345], np.uint64)
    for s in (5, 200, 64):
        assert t.set_slot(key, s) == 1
    assert not _row(t, 12345) & _OVER_BIT and t.num_overflow == 0
    assert t.set_slot(key, 64) == 0  # already a holder: no change
    assert t.set_slot(key, 0) == 1  # the 4th holder
    assert _row(t, 12345) & _OVER_BIT and t.num_overflow == 1
    assert t.set_slot(key, 255) == 1
    assert t.clear_slot_of(key, 200) == 1  # 4 left: still overflow
    assert _row(t, 12345) & _OVER_BIT
    assert t.clear_slot_of(key, 0) == 1  # 3 left: inline again, overflow row freed
    assert not _row(t, 12345) & _OVER_BIT and t.num_overflow == 0
    assert [s for s in (0, 5, 64, 200, 255) if t.has(key[0], s)] == [5, 64, 255]
    for s in (5, 64, 255):
        t.clear_slot_of(key, s)
    assert len(t) == 0 and hk.find(t.tab, t.bits, key[0]) < 0


def test_a_block_held_by_every_slot_and_slot_removal() -> None:
    """256 holders of one block, 2 of another; removing slots one by one (the replica-leave
    scan) walks the first back to inline and deletes both rows at the end."""
    t = HolderTable(num_words=4, overflow_rows=1)
    a, b = np.asarray([7], np.uint64), np.asarray([9], np.uint64)
    for s in range(256):
        t.set_slot(a, s)
    t.set_slot(b, 3)
    t.set_slot(b, 250)
    assert t.holders(a[0]).tolist() == [2**64 - 1] * 4 and t.num_overflow == 1
    for s in range(255, -1, -1):
        t.clear_slot(s)
        if s:  # NOTE: slots 0 .. s-1 still hold it
            assert bool(_row(t, 7) & _OVER_BIT) == (s > 3)
            assert t.holders(a[0])[0] == (1 << min(s, 64)) - 1
    assert len(t) == 0 and t.num_overflow == 0


def test_backward_shift_moves_an_overflow_reference_with_its_row() -> None:
    """Three keys homed at the last row (rows 7, 0, 1): deleting the first shifts the overflow
    row and the wrapped one back a row each; both still read their holders."""
    t = HolderTable(num_words=1, bits=3)
    keys = keys_homed_at((7,), 3, 3)
    first, second, third = (np.asarray([x], np.uint64) for x in keys)
    t.set_slot(first, 0)
    for s in range(5):
        t.set_slot(second, s)  # overflow
    t.set_slot(third, 9)
    assert [hk.find(t.tab, t.bits, x[0]) for x in (first, second, third)] == [7, 0, 1]
    t.clear_slot_of(first, 0)
    assert [hk.find(t.tab, t.bits, x[0]) for x in (second, third)] == [7, 0]
    assert _row(t, keys[1]) & _OVER_BIT and len(t) == 2
    assert t.holders(second[0]).tolist() == [0b11111] and t.has(third[0], 9)


def test_rows_are_16_bytes_and_only_4_plus_holders_pay_a_mask() -> None:
    t = HolderTable(num_words=4, bits=10, overflow_rows=64)
    assert t.tab.shape == (1024, 2) and t.tab.dtype == np.uint64
    assert t.nbytes() == 1024 * 16 + 64 * 4 * 8


_MANY = list(range(0, 300, 7))  # 43 slots over 5 mask words
_HASHES = st.sampled_from([0, 1, 2, 3, 4, 5, -5, 2**63 + 1, 2**64 - 1])
_INDEX_OPS = ["store_all", "store", "store_cpu", "remove", "remove_cpu", "clear", "reslot",
              "pending", "tick"]  # fmt: skip
_index_ops = st.lists(
    st.tuples(
        st.sampled_from(_INDEX_OPS),
        st.sampled_from(_MANY),
        st.lists(_HASHES, max_size=5),
    ),
    max_size=40,
)


def _fold(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


@settings(max_examples=150, deadline=None)
@given(ops=_index_ops, queries=st.lists(st.lists(_HASHES, max_size=6), min_size=1, max_size=3))
def test_heavy_overlap_index_equals_the_dict_index(
    ops: list[tuple[str, int, list[int]]], queries: list[list[int]]
) -> None:
    """Many slots holding the same blocks (``store_all``: from ``slot`` up, every listed slot):
    prefixes, counts and membership equal the dict-of-ints index's."""
    clock = FakeClock(0.0)
    new, ref = KVIndex(clock), RefIndex(clock)
    for s in _MANY:
        new.add_slot(s)
        ref.add_slot(s)
    for op, slot, hashes in ops:
        for idx, hs in ((new, hashes), (ref, [_fold(h) for h in hashes])):
            if op == "store_all":
                for s in _MANY:
                    if s >= slot:
                        idx.store(s, hs)
            elif op == "store":
                idx.store(slot, hs)
            elif op == "store_cpu":
                idx.store(slot, hs, "CPU")
            elif op == "remove":
                idx.remove(slot, hs)
            elif op == "remove_cpu":
                idx.remove(slot, hs, "CPU")
            elif op == "clear":
                idx.clear(slot)
            elif op == "reslot":
                idx.remove_slot(slot)
                idx.add_slot(slot)
            elif op == "pending":
                idx.mark_pending(slot, hs, ttl_s=1.0)
            else:
                idx.expire_pending()
        if op == "tick":
            clock.t += 0.7
    mask = sum(1 << s for s in _MANY)
    for q in queries:
        got, want = new.match(q, mask), ref.match([_fold(h) for h in q], mask)
        assert (got.resident, got.pending, got.host) == (want.resident, want.pending, want.host)
    for s in _MANY:
        assert new.num_resident(s) == ref.num_resident(s)
        for h in (0, 3, 2**64 - 1):
            assert new.holds(s, h) == ref.holds(s, _fold(h))
    assert new.num_unique_blocks == ref.num_unique_blocks


def test_a_batch_needing_more_overflow_rows_than_free_grows_the_pool_mid_batch() -> None:
    """100 blocks gain their 4th holder in one call with one free overflow row: the kernel
    stops where the pool runs out, the table grows it and resumes (no block skipped, none
    counted twice)."""
    t = HolderTable(num_words=2, bits=4, overflow_rows=1)
    keys = np.arange(1, 101, dtype=np.uint64)
    for s in (0, 1, 2):
        assert t.set_slot(keys, s) == 100
    assert t.num_overflow == 0 and len(t.over) == 1
    assert t.set_slot(np.concatenate([keys, keys[:10]]), 100) == 100  # duplicates count once
    assert t.num_overflow == 100 and len(t.over) >= 100 and len(t) == 100
    assert all(t.holders(x).tolist() == [0b111, 1 << 36] for x in keys)
    assert t.clear_slot_of(keys[::2], 1) == 50
    assert t.num_overflow == 50
    t.clear_slot(100)
    assert t.num_overflow == 0 and len(t) == 100
    assert all(t.has(x, 0) and t.has(x, 2) and t.has(x, 1) == (i % 2 == 1)
               for i, x in enumerate(keys))  # fmt: skip
