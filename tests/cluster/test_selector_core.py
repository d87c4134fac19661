"""SelectorCore: event protocol, speculative inserts, membership, feedback, metrics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from selector_helpers import FakeClock, request

from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.types import LoadSnapshot, Outcome
from kvmanager.events import MEDIUM_CPU, AllBlocksCleared, BlockRemoved, BlockStored


def _core(clock: FakeClock, n: int = 3, **cfg: object) -> SelectorCore:
    core = SelectorCore(CoreConfig(**cfg), clock=clock)  # type: ignore[arg-type]
    for i in range(n):
        core.join(f"r{i}", node_id=f"n{i}", block_size=16, num_blocks=1000)
    return core


def _stored(hashes: list[int], medium: str = "GPU") -> BlockStored:
    return BlockStored(hashes, None, [], 16, medium=medium)


def test_events_drive_the_match(clock: FakeClock) -> None:
    core = _core(clock)
    q = request(6)
    assert core.apply_events("r1", 0, [_stored(list(q.block_hashes[:4]))]).applied
    assert core.apply_events("r2", 0, [_stored(list(q.block_hashes))]).applied
    sel = core.select(q, speculative=False)
    assert [r.replica_id for r in sel.ranked][:2] == ["r2", "r1"]
    assert {r.replica_id: r.terms.num_matched_blocks for r in sel.ranked} == {
        "r0": 0,
        "r1": 4,
        "r2": 6,
    }
    core.apply_events("r2", 1, [BlockRemoved([q.block_hashes[1]])])
    assert core.select(q, speculative=False).ranked[0].replica_id == "r1"
    core.apply_events("r1", 1, [AllBlocksCleared()])
    sel = core.select(q, speculative=False)
    assert {r.replica_id: r.terms.num_matched_blocks for r in sel.ranked} == {
        "r0": 0,
        "r1": 0,
        "r2": 1,
    }


def test_sequence_gap_requires_resync_and_spares_others(clock: FakeClock) -> None:
    core = _core(clock)
    core.apply_events("r0", 0, [_stored([1, 2])])
    core.apply_events("r1", 0, [_stored([1, 2, 3])])
    gap = core.apply_events("r1", 5, [_stored([4])])
    assert gap.resync_required and not gap.applied and gap.last_seq == 0
    assert {r.replica_id: r.synced for r in core.list_replicas()}["r1"] is False
    # nothing from the gapped batch applied; r0 untouched
    sel = core.select(request(4), speculative=False)
    assert {r.replica_id: r.terms.num_matched_blocks for r in sel.ranked} == {
        "r0": 2,
        "r1": 3,
        "r2": 0,
    }
    res = core.resync("r1", 10, [1, 2, 3, 4])
    assert res.applied and res.num_events == 4
    assert core.apply_events("r1", 11, [_stored([5])]).applied
    sel = core.select(request(5), speculative=False)
    assert sel.ranked[0].replica_id == "r1" and sel.ranked[0].terms.num_matched_blocks == 5


def test_unknown_replicas_are_ignored_and_counted(clock: FakeClock) -> None:
    core = _core(clock, n=2)
    assert not core.apply_events("ghost", 0, [_stored([1])]).applied
    sel = core.select(request(2), candidate_ids=["r1", "ghost", "nope"])
    assert [r.replica_id for r in sel.ranked] == ["r1"] and sel.num_unknown_replicas == 2
    assert not core.feedback(Outcome("q", "ghost", 10, 5))
    assert core.stats().counters["unknown_replica"] == 4
    assert core.select(request(2), candidate_ids=["ghost"]).replica_id is None


def test_bad_select_input_raises(clock: FakeClock) -> None:
    core = _core(clock, max_prompt_blocks=8)
    with pytest.raises(ValueError, match="max_prompt_blocks"):
        core.select(request(9))
    with pytest.raises(ValueError, match="unknown policy"):
        core.select(request(2), policy="magic")


def test_speculative_inserts_colocate_a_burst_until_ttl(clock: FakeClock) -> None:
    core = _core(clock, n=4, pending_ttl_s=2.0)
    first = core.select(request(8, prefix=7, request_id="a"))
    home = first.replica_id
    # siblings share the prefix; no KV event has arrived yet
    for i in range(5):
        sib = core.select(request(8, prefix=7, request_id=f"s{i}"))
        assert sib.replica_id == home
        assert (
            sib.ranked[0].terms.num_pending_blocks == 8
            and sib.ranked[0].terms.num_matched_blocks == 0
        )
    assert {r.replica_id: r.num_pending_blocks for r in core.list_replicas()}[home] == 8
    clock.advance(2.5)
    after = core.select(request(8, prefix=7), speculative=False)
    assert all(r.terms.num_pending_blocks == 0 for r in after.ranked)
    # without speculation nothing is marked
    core.select(request(8, prefix=9), speculative=False)
    assert all(r.num_pending_blocks == 0 for r in core.list_replicas())


def test_inflight_load_spreads_unrelated_requests(clock: FakeClock) -> None:
    core = _core(clock, n=4)
    homes = {core.select(request(64, prefix=p, num_output_tokens=512)).replica_id for p in range(4)}
    assert len(homes) == 4  # routed tokens count as load until the next snapshot
    core.update_load("r0", LoadSnapshot(num_blocks=1000, num_free_blocks=1000))
    assert core.select(request(64, prefix=99)).replica_id == "r0"


def test_host_tier_events_lower_locality(clock: FakeClock) -> None:
    core = _core(clock, n=2)
    core.apply_events("r0", 0, [_stored([1, 2, 3, 4])])
    core.apply_events("r1", 0, [_stored([1, 2, 3, 4], MEDIUM_CPU)])
    sel = core.select(request(4), speculative=False)
    terms = {r.replica_id: r.terms for r in sel.ranked}
    # NOTE: tier share x S (match_scaled_features): 1 x 1 and 0.5 x 0.5
    assert terms["r0"].locality == 1.0 and terms["r1"].locality == 0.25
    assert sel.replica_id == "r0"


def test_hotness_grows_with_routed_requests(clock: FakeClock) -> None:
    core = _core(clock, n=1)
    core.apply_events("r0", 0, [_stored(list(request(8).block_hashes))])
    assert core.select(request(8)).ranked[0].terms.frequency == 0.0  # never routed here yet
    f0 = core.select(request(8)).ranked[0].terms.frequency
    for _ in range(5):
        core.select(request(8))
    f1 = core.select(request(8)).ranked[0].terms.frequency
    assert 0 < f0 < f1
    clock.advance(600)  # ten half-lives
    assert core.select(request(8)).ranked[0].terms.frequency < f0


def test_join_leave_and_stale_expiry(clock: FakeClock) -> None:
    core = _core(clock, n=3, stale_after_s=10.0)
    core.apply_events("r2", 0, [_stored([1, 2])])
    assert core.leave("r2") and not core.leave("r2")
    assert core.stats().num_unique_blocks == 0
    clock.advance(6)
    core.touch("r0")
    clock.advance(6)
    assert core.expire_stale() == ["r1"]
    assert [r.replica_id for r in core.list_replicas()] == ["r0"]
    core.join("r9")  # reuses a freed slot, starts empty
    assert {r.replica_id: r.num_resident_blocks for r in core.list_replicas()} == {"r0": 0, "r9": 0}


def test_feedback_sets_reward_and_metrics(clock: FakeClock) -> None:
    core = _core(clock, n=2)
    core.apply_events("r0", 0, [_stored([1, 2, 3, 4])])
    sel = core.select(request(4, request_id="q1"))
    assert sel.replica_id == "r0"
    assert core.feedback(Outcome("q1", "r0", 64, 64, ttft_s=0.0))
    after = core.select(request(1, prefix=5), speculative=False)
    assert {r.replica_id: r.terms.reward for r in after.ranked}["r0"] == 0.0  # as predicted
    text = generate_latest(core.metrics.registry).decode()
    for name in (
        "tinyserve_selector_select_latency_seconds_bucket",
        'tinyserve_selector_decisions_total{policy="tinyserve"} 2.0',
        "tinyserve_selector_predicted_hit_tokens_total 64.0",
        "tinyserve_selector_realised_hit_tokens_total 64.0",
        'tinyserve_selector_index_blocks{replica_id="r0"} 4.0',
        'tinyserve_selector_block_events_total{kind="stored"} 4.0',
    ):
        assert name in text, name


_step = st.one_of(
    st.tuples(st.just("store"), st.integers(0, 5), st.integers(0, 40), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 5), st.integers(0, 40), st.booleans()),
    st.tuples(st.just("load"), st.integers(0, 5), st.integers(0, 3000), st.booleans()),
    st.tuples(st.just("feedback"), st.integers(0, 5), st.integers(0, 64), st.booleans()),
    st.tuples(st.just("select"), st.integers(0, 5), st.integers(1, 40), st.booleans()),
    st.tuples(st.just("tick"), st.integers(0, 5), st.integers(0, 3), st.booleans()),
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(_step, min_size=1, max_size=40), reward=st.sampled_from([0.0, 0.5]))
def test_fast_path_answers_exactly_like_the_generic_path(
    steps: list[tuple[str, int, int, bool]], reward: float
) -> None:
    """The tinyserve policy's compiled path (no Candidates) and the generic one (Candidates ->
    policy.select -> top) give identical Selections on any history: rankings, scores, terms,
    and so identical pending marks and in-flight load afterwards."""
    from cluster.selector.objective import ObjectiveConfig

    clock = FakeClock(0.0)
    cfg = CoreConfig(objective=ObjectiveConfig(lambda_reward=reward))
    fast, slow = SelectorCore(cfg, clock=clock), SelectorCore(cfg, clock=clock)
    slow.fast_path = False
    seqs = [0] * 6
    for core in (fast, slow):
        for r in range(6):
            core.join(f"r{r}", node_id=f"n{r % 2}", block_size=16, num_blocks=200 * (r % 3))
    chain = list(range(1000, 1040))
    for op, r, x, flag in steps:
        rid = f"r{r}"
        if op in ("store", "remove"):
            seqs[r] += 1
            ev: BlockStored | BlockRemoved
            if op == "store":
                ev = BlockStored(chain[:x], None, [], 16, None, MEDIUM_CPU if flag else None)
            else:
                ev = BlockRemoved(chain[x:], MEDIUM_CPU if flag else None)
            for core in (fast, slow):
                core.apply_events(rid, seqs[r], [ev])
        elif op == "load":
            snap = LoadSnapshot(num_blocks=400, num_free_blocks=x % 400, num_cached_blocks=x % 97,
                                num_running_tokens=x, ttft_ewma_s=x / 1000, f_total=x / 3000,
                                prefill_tokens_per_s=(0.0, 200.0, 29000.0)[x % 3])  # fmt: skip
            for core in (fast, slow):
                core.update_load(rid, snap)
        elif op == "feedback":
            for core in (fast, slow):
                core.feedback(Outcome(f"q{x}", rid, 64, x, ttft_s=0.1))
        elif op == "tick":
            clock.advance(x)
        else:
            q = request(x, prefix=0, request_id=f"q{len(steps)}-{x}", num_output_tokens=r * 7,
                        origin_node_id="n1" if flag else "")  # fmt: skip
            q = type(q)(q.request_id, chain[:x], q.num_prompt_tokens, q.num_output_tokens,
                        q.session_id, q.origin_node_id)  # fmt: skip
            cands = [f"r{i}" for i in range(6) if i != r] if flag else []
            a = fast.select(q, cands, max_results=r)
            b = slow.select(q, cands, max_results=r)
            assert a == b
