"""The fast path's bound arrays (``Ranker._bind``, ``generation.py``): after every kind of
growth (pending tables and queue, the access table, the device / host holder tables and
their overflow pool, the replica table's columns, widening past 64 slots) the binding a
Select used holds the owners' current arrays, and its answers equal the generic path's."""

from __future__ import annotations

import numpy as np
from selector_helpers import FakeClock

from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.generation import Generation
from cluster.selector.types import SelectionRequest
from kvmanager.events import MEDIUM_CPU, MEDIUM_GPU, BlockStored


def _same_binding(core: SelectorCore) -> None:
    ranker = core._ranker
    bound, now = ranker._bound, ranker.bound_now()
    assert len(bound) == len(now)
    for i, (a, b) in enumerate(zip(bound, now, strict=True)):
        if isinstance(b, np.ndarray):
            assert a is b, f"bound argument {i} is a replaced array"
        else:
            assert a == b, f"bound argument {i}: {a} != {b}"


def test_binding_follows_every_growth() -> None:
    rng = np.random.default_rng(7)
    clock = FakeClock()
    # NOTE: tiny reservations, so pending rows, deadlines, the queue and the access table
    # all grow during the run
    core = SelectorCore(CoreConfig(stale_after_s=1e9, pending_reserve_marks=16), clock=clock)
    base = rng.integers(1, 1 << 62, 4000).tolist()
    seq: dict[str, int] = {}
    gens = {Generation.value}
    for step in range(160):
        rid = f"r{step % 150}"
        if rid not in seq:  # NOTE: 150 replicas: the table grows, the masks widen to 3 words
            core.join(rid, node_id=f"n{step % 5}", num_blocks=4096)
            seq[rid] = -1
        start = int(rng.integers(0, 3000))
        n = int(rng.integers(1, 200))
        seq[rid] += 1
        medium = MEDIUM_CPU if step % 4 == 0 else MEDIUM_GPU
        core.apply_events(rid, seq[rid], [BlockStored(base[start : start + n], None, [], 16,
                                                      medium=medium)])  # fmt: skip
        prompt = base[start : start + int(rng.integers(1, 120))] + rng.integers(
            1, 1 << 62, int(rng.integers(0, 60))).tolist()  # fmt: skip
        req = SelectionRequest(f"q{step}", prompt, 16 * len(prompt))
        sel = core.select(req, max_results=3)
        _same_binding(core)
        gens.add(Generation.value)
        # NOTE: the same question on the generic path (no speculative insert: the state
        # stays as it is) gives the same answer
        core.fast_path = False
        ref = core.select(req, max_results=3, speculative=False)
        core.fast_path = True
        fast = core.select(req, max_results=3, speculative=False)
        assert [(r.replica_id, r.score) for r in fast.ranked] == [
            (r.replica_id, r.score) for r in ref.ranked
        ]
        assert sel.ranked
        clock.t += 0.05
    # NOTE: the run did replace arrays (else it would not test the binding)
    assert len(gens) > 5


def _arrays(obj: object, names: tuple[str, ...]) -> list[object]:
    # NOTE: the arrays themselves, not their ids (a freed array's id may be reused)
    return [getattr(obj, n) for n in names]


def test_every_array_replacement_bumps_the_generation() -> None:
    """Each owner alone: an operation that replaced one of its arrays moved the count (a
    binding checks nothing else; a missed bump would serve stale arrays)."""
    from cluster.selector.access import AccessTracker
    from cluster.selector.holder_table import HolderTable
    from cluster.selector.index import KVIndex
    from cluster.selector.pending_deadlines import PendingDeadlines
    from cluster.selector.pending_queue import PendingQueue
    from cluster.selector.replica_table import ReplicaTable

    hashes = np.arange(1, 5000, dtype=np.uint64)
    holder, pend = HolderTable(bits=4, overflow_rows=1), HolderTable(bits=4, overflow_rows=1)
    acc, dls, queue = AccessTracker(lambda: 1.0, bits=3), PendingDeadlines(bits=3), PendingQueue(2, 4)
    table, index = ReplicaTable(capacity=2), KVIndex(lambda: 1.0)
    cases = [
        (holder, ("tab", "over"), lambda: holder.reserve(100)),
        (holder, ("tab", "over"), lambda: holder.widen(3)),
        # NOTE: four holders of one block: the block moves to the overflow pool, which grows
        (holder, ("tab", "over"), lambda: [holder.set_slot(hashes[:50], s) for s in range(5)]),
        # NOTE: the pending rows' reservation ahead of a compiled mark (route, rank_and_route)
        (pend, ("tab", "over"), lambda: pend.reserve_overflow(100)),
        (acc, ("keys", "slots", "vt"), lambda: acc.reserve(100)),
        (dls, ("keys", "slots", "dl"), lambda: dls.reserve(100)),
        (queue, ("dl", "meta", "ring", "state"), lambda: queue.reserve(100, 10)),
        (table, ("ints", "floats", "node_of_slot"),
         lambda: [table.add(f"r{i}", "n", 16, 64) for i in range(5)]),
        (index, ("_num_pending",), lambda: index.add_slot(200)),
    ]  # fmt: skip
    for i, (owner, names, op) in enumerate(cases):
        before, gen = _arrays(owner, names), Generation.value
        op()
        replaced = any(a is not b for a, b in zip(_arrays(owner, names), before, strict=True))
        assert replaced, f"case {i} ({type(owner).__name__}) replaced nothing"
        assert Generation.value != gen, f"case {i}: {type(owner).__name__} replaced an array, no bump"
