"""R(c) (cluster/selector/reward.py): predictions, fleet calibration, discounting, fading, and in the
core: a replica slower than its reports loses traffic, then wins it back."""

from __future__ import annotations

import math

import pytest
from selector_helpers import FakeClock, request

from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.objective import ObjectiveConfig
from cluster.selector.reward import RewardBook, discounted_mean, discounted_ratio, predict
from cluster.selector.types import LoadSnapshot, Outcome


def test_prediction_is_the_own_prefill_at_the_reported_rate() -> None:
    cfg = ObjectiveConfig(prefill_tokens_per_s=1000.0)
    p = predict("r0", 256, 64, 2000.0, cfg)
    assert p.num_cached_tokens == 64 and math.isclose(p.own_s, 192 / 2000.0)
    q = predict("r0", 256, 0, 0.0, cfg)  # no reported rate: the configured one
    assert math.isclose(q.own_s, 0.256)
    assert predict("r0", 32, 64, 0.0, cfg) == ("r0", 32, 0.0)  # match capped at the prompt


def test_discounted_mean_and_ratio_newest_first() -> None:
    assert math.isclose(discounted_mean([1.0, 0.0, 0.5], 0.5), (1.0 + 0.0 + 0.125) / 1.75)
    assert discounted_mean([], 0.9) == 0.0
    assert math.isclose(discounted_ratio([(2.0, 1.0), (1.0, 1.0)], 0.5), 2.5 / 1.5)
    assert discounted_ratio([(1.0, 0.0)], 0.5) == 1.0


def _cfg(**kw: float) -> ObjectiveConfig:
    base = {"prefill_tokens_per_s": 1000.0, "reward_tolerance": 0.5, "gamma": 0.5,
            "reward_half_life_s": 10.0}  # fmt: skip
    base.update(kw)
    return ObjectiveConfig(**base)  # type: ignore[arg-type]


def _outcome(book: RewardBook, rid: str, replica: str, own_tokens: int, ttft: float,
             now: float = 0.0) -> float | None:  # fmt: skip
    book.expect(rid, predict(replica, own_tokens, 0, 0.0, book.cfg))
    return book.observe(Outcome(rid, replica, own_tokens, 0, ttft_s=ttft), now)


def test_slowness_is_relative_to_the_fleet() -> None:
    book = RewardBook(_cfg())
    # the whole fleet takes 2x its predicted prefill: that is the norm, not a penalty
    for i in range(200):
        assert _outcome(book, f"a{i}", f"r{i % 4}", 100, 0.2) == 0.0
    assert math.isclose(book.fleet_scale, 2.0)
    # r9 takes 3x the fleet's norm: k = 3, R = -(3 - 1 - 0.5)
    r = _outcome(book, "s", "r9", 100, 0.6)
    assert r is not None and math.isclose(r, -1.5, rel_tol=0.05)
    rec = book.replica("r9")
    assert rec is not None and math.isclose(rec.slowness(0.5, book.fleet_scale), 3.0, rel_tol=0.05)
    # it fades: one half-life later, half the penalty
    assert math.isclose(book.value("r9", 10.0), r / 2)


def test_outcomes_without_a_prediction_do_not_count() -> None:
    book = RewardBook(_cfg())
    assert book.observe(Outcome("nope", "r0", 100, 0, ttft_s=9.0), 0.0) is None
    book.expect("c", predict("r1", 100, 0, 0.0, book.cfg))
    assert book.observe(Outcome("c", "r0", 100, 0, ttft_s=9.0), 0.0) is None  # wrong replica
    assert book.replica("r0") is None and book.value("r0", 0.0) == 0.0


def test_missed_predicted_hits_are_recorded() -> None:
    cfg = _cfg()
    book = RewardBook(cfg)
    book.expect("a", predict("r0", 256, 128, 1000.0, cfg))
    book.observe(Outcome("a", "r0", 256, 32, ttft_s=0.5), 0.0)
    rec = book.replica("r0")
    assert rec is not None and math.isclose(rec.miss_ratio(cfg.gamma), 96 / 128)


_LOAD = LoadSnapshot(num_blocks=1000, num_free_blocks=1000, prefill_tokens_per_s=1000.0)


def _fleet(clock: FakeClock, lambda_reward: float, n: int = 4) -> SelectorCore:
    cfg = CoreConfig(objective=_cfg(lambda_reward=lambda_reward))
    core = SelectorCore(cfg, clock=clock)
    for i in range(n):
        core.join(f"r{i}", block_size=16, num_blocks=1000)
        core.update_load(f"r{i}", _LOAD)
    return core


def _serve(core: SelectorCore, clock: FakeClock, batches: int, slow: str) -> list[list[str]]:
    """Route batches of 3 concurrent cold 256-token requests (in-flight load spreads a batch),
    then complete them with the TTFT each replica really takes: ``slow`` runs 4x slower than
    it reports. Returns the replicas chosen per batch."""
    out = []
    for b in range(batches):
        qs = [request(16, prefix=1 + 3 * b + i, request_id=f"q{b}-{i}") for i in range(3)]
        chosen = [core.select(q).replica_id for q in qs]
        out.append([str(c) for c in chosen])
        ttfts = [0.256 * (4.0 if c == slow else 1.0) for c in chosen]
        clock.advance(max(ttfts))
        for q, c, t in zip(qs, chosen, ttfts, strict=True):
            core.feedback(Outcome(q.request_id, str(c), 256, 0, ttft_s=t))
        for r in core.list_replicas():
            core.update_load(r.replica_id, _LOAD)
    return out


@pytest.mark.parametrize("lambda_reward", [0.0, 1.0])
def test_a_replica_slower_than_its_reports_loses_traffic_then_recovers(
    lambda_reward: float,
) -> None:
    clock = FakeClock(0.0)
    core = _fleet(clock, lambda_reward)
    batches = _serve(core, clock, 12, slow="r0")
    # every replica reports the same rate and an empty queue: only R can tell r0 is slow
    later = [c for batch in batches[4:] for c in batch]
    if lambda_reward == 0.0:
        assert later.count("r0") == 8  # one per batch: the first of equals
        return
    assert later.count("r0") == 0
    reward = {r.replica_id: r.terms.reward for r in core.select(request(1, prefix=999)).ranked}
    assert reward["r0"] < -0.2 and reward["r1"] == reward["r2"] == reward["r3"] == 0.0
    # the others get a queue worth 0.2 s (0.6 of score at alpha_load 3): less than r0's
    # penalty now, more once that has faded (no new evidence while r0 was not used)
    busy = LoadSnapshot(num_blocks=1000, num_free_blocks=1000, num_waiting_tokens=200,
                        prefill_tokens_per_s=1000.0)  # fmt: skip
    for r in ("r1", "r2", "r3"):
        core.update_load(r, busy)
    assert core.select(request(16, prefix=700), speculative=False).replica_id != "r0"
    clock.advance(60.0)
    core.update_load("r0", _LOAD)
    assert core.select(request(16, prefix=800), speculative=False).replica_id == "r0"


def test_feedback_over_grpc_from_the_replica_sink_penalises_the_slow_replica() -> None:
    """The real path: each replica's SelectorSink (replicas/deployment_report.py's sink) streams its
    load and sends Feedback on completion over loopback gRPC; the router's SelectorClient
    then sees R(c) < 0 for the replica 4x slower than its reports, and it is not chosen."""
    import time

    from cluster.selector.client import SelectorClient
    from cluster.selector.server import ServerThread
    from cluster.serve.app_reporting import SelectorSink
    from replicas.deployment import ReplicaLoad, SinkSpec
    from replicas.outputs import RequestMetrics, RequestOutput

    # NOTE: lambda 2: the penalty (~0.8 x 2) clears a stale in-flight charge (~0.77) that a
    # snapshot still on the wire has not reset yet
    core = SelectorCore(CoreConfig(objective=_cfg(lambda_reward=2.0)))
    with ServerThread(core) as st:
        sinks = {f"r{i}": SelectorSink(SinkSpec(st.address, f"r{i}", "n0", 16, 1000, "fast"))
                 for i in range(4)}  # fmt: skip
        client = SelectorClient(st.address, timeout_s=5.0)
        try:
            load = ReplicaLoad(1000, 1000, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0,
                               prefill_tokens_per_s=1000.0)  # fmt: skip

            def report() -> None:
                for s in sinks.values():
                    s.snapshot(load)
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline and not (
                    len(core.list_replicas()) == 4
                    and all(r.load.prefill_tokens_per_s == 1000.0 for r in core.list_replicas())
                ):
                    time.sleep(0.01)

            report()
            for b in range(6):
                chosen = []
                # NOTE: slots follow the order the streams connected; a first batch of 4 gives
                # every replica (r0 included) work, later batches of 3 can leave one out
                for i in range(4 if b == 0 else 3):
                    q = request(16, prefix=10 + 4 * b + i, request_id=f"g{b}-{i}")
                    sel = client.select(q.block_hashes, q.num_prompt_tokens, request_id=q.request_id)
                    assert sel is not None and sel.replica_id is not None
                    chosen.append((q.request_id, sel.replica_id))
                n_before = core.counters["feedback"]
                for rid, rep in chosen:
                    ttft = 0.256 * (4.0 if rep == "r0" else 1.0)
                    out = RequestOutput(rid, [1], "", True, "length", 256, 0, 1, None,
                                        RequestMetrics(ttft_s=ttft))  # fmt: skip
                    sinks[rep].feedback(rid, out)
                deadline = time.monotonic() + 5.0
                while core.counters["feedback"] < n_before + len(chosen) and time.monotonic() < deadline:
                    time.sleep(0.01)
                report()
            sel = client.select(request(16, prefix=500).block_hashes, 256)
            assert sel is not None
            reward = {r.replica_id: r.terms.reward for r in sel.ranked}
            assert reward["r0"] < 0.0 and reward["r1"] == reward["r2"] == reward["r3"] == 0.0
            assert sel.replica_id != "r0"
        finally:
            client.close()
            for s in sinks.values():
                s.close()


def test_outcomes_without_a_ttft_give_no_evidence() -> None:
    """A replica that reports TTFT 0.0 (unknown) everywhere: no penalty, no error."""
    book = RewardBook(_cfg())
    for i in range(5):
        assert _outcome(book, f"z{i}", "r0", 100, 0.0) == 0.0
    assert book.fleet_scale == 0.0 and book.value("r0", 1.0) == 0.0
