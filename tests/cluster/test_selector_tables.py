"""The tables under the index: the pending deadlines' backward-shift deletion keeps every key
findable; the pending queue's rings grow and wrap without losing a mark. (The pending rows:
test_selector_pending_rows.py; the resident tiers' rows: test_selector_holder_table.py.)

Tiny tables (16 rows), every history checked against a dict.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from index_reference import KVIndex as RefIndex
from selector_helpers import FakeClock

from cluster.selector import pending_deadlines as pd
from cluster.selector.index import KVIndex
from cluster.selector.pending_deadlines import PendingDeadlines
from cluster.selector.pending_queue import PendingQueue

_SLOTS = [0, 1, 65]


_DL_KEYS = list(range(12))
_dl_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "expire", "drop", "tick"]),
        st.sampled_from(_SLOTS),
        st.lists(st.sampled_from(_DL_KEYS), max_size=5),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=_dl_ops)
def test_pending_deadlines_equal_a_dict(ops: list[tuple[str, int, list[int]]]) -> None:
    t = PendingDeadlines(bits=4)
    ref: dict[tuple[int, int], float] = {}
    now = 0.0
    for op, slot, keys in ops:
        arr = np.asarray(keys, np.uint64)
        if op == "set":
            new = sum(1 for x in dict.fromkeys(keys) if (x, slot) not in ref)
            assert t.set(arr, slot, now + 1.0 + len(keys) % 2) == new
            ref.update({(x, slot): now + 1.0 + len(keys) % 2 for x in keys})
        elif op == "expire":
            due = [x for x in dict.fromkeys(keys) if ref.get((x, slot), np.inf) <= now]
            assert t.expire(arr, slot, now).tolist() == due
            for x in due:
                del ref[(x, slot)]
        elif op == "drop":
            gone = sorted(x for x, s in ref if s == slot)
            assert sorted(t.drop_slot(slot).tolist()) == gone
            ref = {key: d for key, d in ref.items() if key[1] != slot}
        else:
            now += 0.7
        assert t.count == len(ref)
        for x in _DL_KEYS:
            for s in _SLOTS:
                i = pd._find(t.keys, t.slots, t.bits, np.uint64(x), s)
                assert (i >= 0) == ((x, s) in ref)
                if i >= 0:
                    assert t.dl[i] == ref[(x, s)]


_queue_ops = st.lists(
    st.tuples(
        st.sampled_from(["pending", "tick", "expire", "reslot"]),
        st.sampled_from(_SLOTS),
        st.lists(st.integers(0, 9), max_size=7),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=_queue_ops)
def test_pending_queue_through_ring_growth_equals_the_reference(
    ops: list[tuple[str, int, list[int]]],
) -> None:
    """A KVIndex whose pending queue starts at 2 marks / 4 hashes (so it grows and wraps)
    expires exactly what the dict index does."""
    clock = FakeClock(0.0)
    new, ref = KVIndex(clock), RefIndex(clock)
    new._queue = PendingQueue(num_marks=2, num_hashes=4)
    for s in _SLOTS:
        new.add_slot(s)
        ref.add_slot(s)
    for op, slot, hashes in ops:
        for idx in (new, ref):
            if op == "pending":
                idx.mark_pending(slot, hashes, ttl_s=1.0 + len(hashes) % 3)
            elif op == "expire":
                assert new.expire_pending(len(hashes)) == ref.expire_pending(len(hashes))
                break
            elif op == "reslot":
                idx.remove_slot(slot)
                idx.add_slot(slot)
        if op == "tick":
            clock.t += 0.7
        for s in _SLOTS:
            assert new.num_pending(s) == ref.num_pending(s)
    mask = sum(1 << s for s in _SLOTS)
    assert new.match(list(range(10)), mask).pending == ref.match(list(range(10)), mask).pending
    clock.t += 10.0
    assert new.expire_pending() == ref.expire_pending()
    assert all(new.num_pending(s) == 0 for s in _SLOTS)
