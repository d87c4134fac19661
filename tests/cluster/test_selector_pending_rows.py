"""The pending marks in 16-byte holder rows (``pending_rows``, ``HolderTable``): marks of one
slot inline, a block pending on 4+ slots in the overflow pool, expiry's backward-shift
deletes, a slot leaving with marks, growth of the rows and of the pool; every history checked
against a dict of sets (``slot_reference``) or the dict-of-ints index (``index_reference``).

Tiny tables (8 rows) with keys sharing home rows at the table's end, so probe runs collide and
wrap around row 0.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from index_reference import KVIndex as RefIndex
from selector_helpers import FakeClock
from slot_reference import apply_op, check_holder_table, keys_homed_at

from cluster.selector import holder_kernels as hk
from cluster.selector import pending_rows
from cluster.selector.holder_table import HolderTable
from cluster.selector.index import KVIndex
from cluster.selector.index_kernels import SINK

_SLOTS = [0, 1, 2, 3, 63, 64, 130]
_KEYS = keys_homed_at((6, 7, 0), 3, 2)

_ops = st.lists(
    st.tuples(
        st.sampled_from(["mark", "mark", "mark", "unmark", "clear_slot", "grow"]),
        st.sampled_from(_SLOTS),
        st.lists(st.sampled_from(_KEYS), max_size=4),
    ),
    max_size=80,
)


def _mark(t: HolderTable, keys: np.ndarray, slot: int) -> int:
    """What the Select's route does: reserve, then the compiled mark (no growth inside)."""
    t.reserve(len(keys))
    t.reserve_overflow(len(keys))
    added, created = pending_rows.mark(t.tab, t.bits, t.over, t.ostate, keys, slot, SINK)
    t.count += int(created)
    return int(added)


def _unmark(t: HolderTable, keys: np.ndarray, slot: int) -> int:
    """What the expiry does with the marks due."""
    removed, deleted = pending_rows.unmark(t.tab, t.bits, t.over, t.ostate, keys, slot, SINK)
    t.count -= int(deleted)
    return int(removed)


@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_pending_rows_equal_a_dict_through_overflow_growth_and_colliding_deletes(
    ops: list[tuple[str, int, list[int]]],
) -> None:
    t = HolderTable(num_words=3, bits=3, overflow_rows=1)
    ref: dict[int, set[int]] = {}
    for op, slot, keys in ops:
        arr = np.asarray(keys, np.uint64)
        if op == "grow":  # NOTE: one doubling (a rehash) with the marks in place
            bits = t.bits
            if bits < 7:
                t.reserve(int(0.8 * (1 << bits)) + 1 - len(t))
                assert t.bits == bits + 1
        elif op in ("mark", "unmark"):
            want = apply_op(ref, "set" if op == "mark" else "clear", slot, keys)
            assert (_mark if op == "mark" else _unmark)(t, arr, slot) == want
        else:
            apply_op(ref, op, slot, keys)
            t.clear_slot(slot)
        check_holder_table(t, ref, _KEYS, _SLOTS)


def test_a_mark_of_one_slot_is_one_inline_row() -> None:
    """The usual mark (a Select's unmatched blocks on its winner): one 16-byte row a block,
    the slot id in the row's first field, nothing in the overflow pool."""
    idx = KVIndex(FakeClock(0.0))
    for s in (0, 200):
        idx.add_slot(s)
    idx.mark_pending(200, [11, 12, 13], ttl_s=1.0)
    p = idx._pending
    assert p.tab.shape[1] == 2 and len(p) == 3 and p.num_overflow == 0
    for h in (11, 12, 13):
        row = p.tab[hk.find(p.tab, p.bits, np.uint64(h)), 1]
        assert int(row) == 200 + 1
    assert idx.num_pending(200) == 3


def test_a_fifth_mark_takes_an_overflow_row_and_expiry_gives_it_back() -> None:
    clock = FakeClock(0.0)
    idx = KVIndex(clock)
    for s in range(6):
        idx.add_slot(s)
    for s in range(5):
        idx.mark_pending(s, [7], ttl_s=1.0 + s)
    p = idx._pending
    assert p.num_overflow == 1 and p.holders(np.uint64(7)).tolist()[0] == 0b11111
    clock.t = 2.5  # NOTE: slots 0 and 1 due: 3 left, inline again
    assert idx.expire_pending() == 2
    assert p.num_overflow == 0 and p.holders(np.uint64(7)).tolist()[0] == 0b11100
    assert idx.match([7], 0b111111).pending == {2: 1, 3: 1, 4: 1}


_MANY = [0, 1, 2, 3, 4, 65, 130]
_PKEYS = keys_homed_at((6, 7, 0), 3, 3)
_index_ops = st.lists(
    st.tuples(
        st.sampled_from(["pending", "pending", "tick", "expire", "reslot"]),
        st.sampled_from(_MANY),
        st.lists(st.sampled_from(_PKEYS), max_size=5),
    ),
    max_size=50,
)


@settings(max_examples=150, deadline=None)
@given(ops=_index_ops)
def test_index_pending_rows_equal_the_dict_index_through_expiry_and_slot_removal(
    ops: list[tuple[str, int, list[int]]],
) -> None:
    """The index's pending table, started at 8 rows and one overflow row (so it grows), holds
    exactly the reference index's pending marks after every mark, bounded expiry (backward
    shifts over colliding keys) and removal of a slot with marks."""
    clock = FakeClock(0.0)
    new, ref = KVIndex(clock), RefIndex(clock)
    for s in _MANY:
        new.add_slot(s)
        ref.add_slot(s)
    new._pending = HolderTable(num_words=new.num_words, bits=3, overflow_rows=1)
    for op, slot, hashes in ops:
        if op == "tick":
            clock.t += 0.7
        elif op == "expire":
            assert new.expire_pending(len(hashes)) == ref.expire_pending(len(hashes))
        for idx in (new, ref):
            if op == "pending":
                idx.mark_pending(slot, hashes, ttl_s=1.0 + len(hashes) % 3)
            elif op == "reslot":
                idx.remove_slot(slot)
                idx.add_slot(slot)
        model = {h: {s for s in _MANY if m >> s & 1} for h, m in ref._pending.items()}
        check_holder_table(new._pending, model, _PKEYS, _MANY)
        for s in _MANY:
            assert new.num_pending(s) == ref.num_pending(s)
    mask = sum(1 << s for s in _MANY)
    assert new.match(_PKEYS, mask).pending == ref.match(_PKEYS, mask).pending
    clock.t += 10.0
    assert new.expire_pending() == ref.expire_pending()
    assert len(new._pending) == 0 and new._pending.num_overflow == 0


def test_touch_run_reads_past_the_table_end_and_changes_nothing() -> None:
    """The prefetch loads the row ``RUN_AHEAD`` after each home, wrapping at the end, on
    tables down to 2 rows (fewer than ``RUN_AHEAD`` + 1), and writes only the sink."""
    for bits in (1, 3):
        t = HolderTable(num_words=2, bits=bits)
        keys = np.asarray(keys_homed_at(((1 << bits) - 1,), bits, 1), np.uint64)
        _mark(t, keys, 65)
        before = t.tab.copy()
        sink = np.zeros(1, np.uint64)
        pending_rows.touch_run(t.tab, t.bits, keys, sink)
        assert np.array_equal(t.tab, before)
        assert t.has(keys[0], 65)
