"""The Select fast path's parts: compiled access counts, the top-k, node codes, the answer's
proto, and the whole path against the generic one at more than 64 replicas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from access_reference import AccessTracker as ReferenceTracker
from hypothesis import given, settings
from hypothesis import strategies as st
from selector_helpers import FakeClock, request

from cluster.selector.access import AccessTracker
from cluster.selector.convert import selection_to_proto
from cluster.selector.core import SelectorCore
from cluster.selector.core_types import Selection
from cluster.selector.select_kernel import _top, _top_passes
from cluster.selector.types import LoadSnapshot, Ranked, ScoreTerms
from kvmanager.events import MEDIUM_CPU, BlockStored
from protos import cache_selection_pb2 as pb

_HASHES = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20, unique=True)
_op = st.one_of(
    st.tuples(st.just("bump"), st.integers(0, 3), st.integers(1, 20)),
    st.tuples(st.just("forget"), st.integers(0, 3), st.integers(0, 20)),
    st.tuples(st.just("forget_all"), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("tick"), st.integers(0, 3), st.integers(0, 90)),
)


@settings(max_examples=200, deadline=None)
@given(chains=st.lists(_HASHES, min_size=1, max_size=3), ops=st.lists(_op, max_size=40),
       matched=st.lists(st.integers(0, 20), min_size=4, max_size=4))  # fmt: skip
def test_compiled_access_counts_equal_the_dict_reference(
    chains: list[list[int]], ops: list[tuple[str, int, int]], matched: list[int]
) -> None:
    """Same bumps, forgets and clock: the same hotness of every slot, within float rounding
    (both decay with exp; the compiled one may fold the exponent differently)."""
    clock = FakeClock(0.0)
    fast, ref = AccessTracker(clock, 30.0, bits=3), ReferenceTracker(clock, 30.0)
    for i, (op, slot, x) in enumerate(ops):
        chain = chains[i % len(chains)]
        if op == "bump":
            fast.bump(slot, chain[:x])
            ref.bump(slot, chain[:x])
        elif op == "forget":
            fast.forget(slot, chain[x:])
            ref.forget(slot, chain[x:])
        elif op == "forget_all":
            fast.forget(slot)
            ref.forget(slot)
        else:
            clock.advance(x)
        for chain in chains:
            m = np.minimum(np.asarray(matched, np.int64), len(chain))
            lengths = set(m[m > 0].tolist())
            got, want = fast.hotness(chain, m, lengths), ref.hotness(chain, m, lengths)
            np.testing.assert_allclose(got, want, rtol=1e-12)
    assert len(fast) == sum(len(per_slot) for per_slot in ref._counts.values())


def test_access_prune_keeps_the_hottest_half() -> None:
    clock = FakeClock(0.0)
    t = AccessTracker(clock, half_life_s=10.0, max_entries=8, bits=3)
    for slot in range(8):  # slot s is bumped s + 1 times at one checkpoint (block 0)
        for _ in range(slot + 1):
            t.bump(slot, [42])
    assert len(t) == 8
    t.bump(8, [42])  # the ninth entry (count 1) crosses max_entries: the 4 coldest go
    assert len(t) == 5
    hot = t.hotness([42], np.ones(9, np.int64))
    assert hot.tolist() == [0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.0]
    clock.advance(10.0)  # one half-life
    assert t.hotness([42], np.ones(9, np.int64))[7] == pytest.approx(4.0)


@settings(max_examples=300, deadline=None)
@given(scores=st.lists(st.sampled_from([-1.5, 0.0, 0.25, 0.25, 1.0, 3.0]), max_size=40),
       k=st.integers(0, 45))  # fmt: skip
def test_top_k_is_a_stable_argsort_prefix(scores: list[float], k: int) -> None:
    s = np.asarray(scores, np.float64)
    top = np.zeros(len(s), np.int64)
    r = _top(s, k, top)
    want = np.argsort(-s, kind="mergesort")
    want = want if k <= 0 else want[:k]
    assert r == len(want)
    assert top[:r].tolist() == want.tolist()


def test_selection_to_proto_carries_every_term() -> None:
    names = [f.name for f in pb.ScoreTerms.DESCRIPTOR.fields]
    values = {name: (i + 1 if name.startswith("num_") else 0.5 + i) for i, name in enumerate(names)}
    terms = ScoreTerms(**values)  # type: ignore[arg-type]
    sel = Selection("tinyserve", [Ranked("r1", 2.5, terms), Ranked("r0", -1.0, ScoreTerms())], 7, 2)
    msg = pb.SelectResponse.FromString(selection_to_proto(sel).SerializeToString())
    assert (msg.policy, msg.num_prompt_blocks, msg.num_unknown_replicas) == ("tinyserve", 7, 2)
    assert [(r.replica_id, r.score) for r in msg.replicas] == [("r1", 2.5), ("r0", -1.0)]
    assert {name: getattr(msg.replicas[0].terms, name) for name in names} == values


def _pair(clock: FakeClock, n: int) -> tuple[SelectorCore, SelectorCore]:
    fast, slow = SelectorCore(clock=clock), SelectorCore(clock=clock)
    slow.fast_path = False
    for core in (fast, slow):
        for r in range(n):
            core.join(f"r{r}", node_id=f"n{r % 5}", block_size=16, num_blocks=100 + r)
    return fast, slow


def test_fast_path_equals_generic_path_beyond_64_replicas() -> None:
    """150 replicas (three mask words), random prefixes on both tiers, loads, node locality,
    and speculative inserts feeding later Selects: identical answers every time."""
    rng = np.random.default_rng(7)
    clock = FakeClock(0.0)
    fast, slow = _pair(clock, 150)
    chains = [list(range(c * 1000 + 1, c * 1000 + 41)) for c in range(6)]
    for r in range(150):
        chain = chains[r % 6]
        ev = BlockStored(chain[: rng.integers(0, 41)], None, [], 16,
                         medium=MEDIUM_CPU if r % 7 == 0 else None)  # fmt: skip
        snap = LoadSnapshot(num_blocks=400, num_free_blocks=int(rng.integers(0, 400)),
                            num_running_tokens=int(rng.integers(0, 5000)),
                            ttft_ewma_s=float(rng.random()), f_total=float(rng.random()))  # fmt: skip
        for core in (fast, slow):
            core.apply_events(f"r{r}", 0, [ev])
            core.update_load(f"r{r}", snap)
    for i in range(60):
        chain = chains[i % 6]
        q = request(40, request_id=f"q{i}", origin_node_id=("", "n3", "n-unknown")[i % 3])
        q = type(q)(q.request_id, [*chain[:10 + i % 31], 10 ** 9 + i], q.num_prompt_tokens,
                    q.num_output_tokens, q.session_id, q.origin_node_id)  # fmt: skip
        cands = [f"r{j}" for j in range(150) if j % (2 + i % 3)] if i % 2 else []
        a = fast.select(q, cands, max_results=i % 5)
        b = slow.select(q, cands, max_results=i % 5)
        assert a == b
        assert a.ranked and not math.isnan(a.ranked[0].score)
        clock.advance(0.05)


def test_origin_node_counts_only_for_replicas_on_it() -> None:
    clock = FakeClock(0.0)
    fast, _ = _pair(clock, 10)  # r3 and r8 on node n3, r4 on n4
    for rid in ("r3", "r4", "r8"):
        fast.apply_events(rid, 0, [BlockStored(list(range(1, 9)), None, [], 16)])
    for origin, want in (("n3", (1.0, 0.5, 1.0)), ("n-unknown", (0.5, 0.5, 0.5)),
                         ("", (1.0, 1.0, 1.0))):  # fmt: skip
        q = request(8, origin_node_id=origin)
        loc = {r.replica_id: r.terms.locality for r in fast.select(q, speculative=False).ranked}
        assert (loc["r3"], loc["r4"], loc["r8"]) == want, origin


def test_fast_path_expires_and_queues_marks_as_the_generic_path() -> None:
    """The compiled Select drains due marks and queues its own (``rank_and_route``): with a
    TTL shorter than the run, both paths hold the same pending marks after every Select, per
    replica and in the tables' counts, and a sweep leaves both empty."""
    clock = FakeClock(0.0)
    fast, slow = _pair(clock, 70)
    for core in (fast, slow):
        core.config = type(core.config)(pending_ttl_s=0.3)
    chains = [list(range(c * 1000 + 1, c * 1000 + 31)) for c in range(4)]
    for i in range(80):
        q = request(30, request_id=f"q{i}")
        q = type(q)(q.request_id, [*chains[i % 4][: 5 + i % 20], 10**9 + i], 480)
        assert fast.select(q, max_results=3) == slow.select(q, max_results=3)
        pend = [{r.replica_id: r.num_pending_blocks for r in c.list_replicas()} for c in (fast, slow)]
        assert pend[0] == pend[1]
        counts = [(c._index._pending.count, c._index._deadlines.count, len(c._index._queue))
                  for c in (fast, slow)]  # fmt: skip
        assert counts[0] == counts[1]
        clock.advance(0.02 + 0.05 * (i % 3))
    assert any(r.num_pending_blocks for r in fast.list_replicas())
    clock.advance(1.0)
    for core in (fast, slow):
        core.expire_stale()
        assert all(r.num_pending_blocks == 0 for r in core.list_replicas())
        assert core._index._pending.count == core._index._deadlines.count == 0


@settings(max_examples=300, deadline=None)
@given(scores=st.lists(st.sampled_from([-1.5, 0.0, -0.0, 0.25, 1.0, 3.0, math.nan]), min_size=2,
                       max_size=40),
       k=st.integers(1, 40))  # fmt: skip
def test_top_k_one_pass_is_the_selection_passes(scores: list[float], k: int) -> None:
    """The one-pass top k (``_top``) orders exactly as the k selection passes, NaN included
    (it hands those to the passes)."""
    s = np.asarray(scores, np.float64)
    k = min(k, len(s) - 1)
    got, want = np.zeros(len(s), np.int64), np.zeros(len(s), np.int64)
    assert _top(s, k, got) == _top_passes(s, k, want) == k
    assert got[:k].tolist() == want[:k].tolist()
