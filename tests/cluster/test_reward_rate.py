"""R(c) acting on the rate (``reward_rate_weight``, cluster/selector/reward.py ``rate_scale``):
a replica slower than its reports is seen slower in the Load term, in seconds, while R keeps
measuring against the reported rate."""

from __future__ import annotations

import math

import pytest
from selector_helpers import FakeClock, request

from cluster.selector.core import CoreConfig, SelectorCore
from cluster.selector.objective import ObjectiveConfig
from cluster.selector.reward import RewardBook, corrected_rate, predict, rate_scale
from cluster.selector.types import LoadSnapshot, Outcome


def test_rate_scale() -> None:
    assert rate_scale(0.0, 2.0) == 1.0
    assert rate_scale(-0.5, 2.0) == pytest.approx(0.5)  # 1 / (1 + 2 * 0.5)
    assert rate_scale(-0.5, 0.0) == 1.0
    assert rate_scale(0.3, 2.0) == 1.0  # R is never a bonus


def test_corrected_rate() -> None:
    off = ObjectiveConfig(prefill_tokens_per_s=1000.0)
    on = ObjectiveConfig(prefill_tokens_per_s=1000.0, reward_rate_weight=1.0)
    assert corrected_rate(4000.0, -1.0, off) == 4000.0  # weight 0: the report as is
    assert corrected_rate(4000.0, 0.0, on) == 4000.0  # no penalty: the report as is
    assert corrected_rate(4000.0, -1.0, on) == pytest.approx(2000.0)
    assert corrected_rate(0.0, -1.0, on) == pytest.approx(500.0)  # none reported: configured
    assert corrected_rate(0.0, 0.0, on) == 0.0  # unreported stays unreported
    with pytest.raises(ValueError, match="reward_rate_weight"):
        ObjectiveConfig(reward_rate_weight=-1.0)


_LOAD = LoadSnapshot(num_blocks=1000, num_free_blocks=1000, prefill_tokens_per_s=1000.0)


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_slow_replica_is_seen_slower_in_the_load_term(weight: float) -> None:
    """R off as a score (lambda_reward 0): only the rate correction can move traffic."""
    clock = FakeClock(0.0)
    cfg = ObjectiveConfig(prefill_tokens_per_s=1000.0, reward_tolerance=0.5, gamma=0.5,
                          lambda_reward=0.0, reward_rate_weight=weight)  # fmt: skip
    core = SelectorCore(CoreConfig(objective=cfg), clock=clock)
    for i in range(4):
        core.join(f"r{i}", block_size=16, num_blocks=1000)
        core.update_load(f"r{i}", _LOAD)
    chosen = []
    for b in range(12):  # batches of 3 cold 256-token requests; r0 is 4x slower than reported
        qs = [request(16, prefix=1 + 3 * b + i, request_id=f"q{b}-{i}") for i in range(3)]
        picks = [str(core.select(q).replica_id) for q in qs]
        chosen += picks if b >= 4 else []
        clock.advance(1.0)
        for q, c in zip(qs, picks, strict=True):
            core.feedback(Outcome(q.request_id, c, 256, 0, ttft_s=0.256 * (4.0 if c == "r0" else 1.0)))
        for i in range(4):
            core.update_load(f"r{i}", _LOAD)
    rates = core._table.cols["prefill_tokens_per_s"]
    r0 = core._table.get("r0")
    assert r0 is not None
    if weight == 0.0:
        assert chosen.count("r0") == 8 and rates[r0.slot] == 1000.0  # nothing moves
        return
    assert chosen.count("r0") == 0
    assert rates[r0.slot] < 0.5 * 1000.0  # the Load term's rate for r0
    terms = {r.replica_id: r.terms for r in core.select(request(16, prefix=900)).ranked}
    assert terms["r0"].load_cost > 0.1 and terms["r1"].load_cost == 0.0
    # the prediction R is measured against stays the reported rate (256 tokens / 1000 per s)
    core.select(request(16, prefix=901, request_id="probe"), candidate_ids=["r0"])
    assert math.isclose(core._rewards._pending["probe"].own_s, 0.256)


@pytest.mark.parametrize("median", [False, True])
def test_fleet_median_keeps_slow_replicas_from_setting_the_norm(median: bool) -> None:
    """A quarter of the fleet 3x slower per predicted second AND given the long prompts:
    their outcomes dominate the fleet's sums (m = 2.54), so against the mean they look only
    1.18x slow (inside the tolerance); against the median replica's ratio they are 3x."""
    cfg = ObjectiveConfig(prefill_tokens_per_s=1000.0, reward_tolerance=0.5, gamma=0.5,
                          reward_fleet_median=median)  # fmt: skip
    book = RewardBook(cfg)
    for i in range(40):
        rid, replica = f"q{i}", f"r{i % 4}"
        slow = replica == "r3"
        book.expect(rid, predict(replica, 1000 if slow else 100, 0, 0.0, cfg))
        book.observe(Outcome(rid, replica, 0, 0, ttft_s=3.0 if slow else 0.1), float(i))
    if not median:
        assert book.fleet_scale == pytest.approx(3.3 / 1.3, rel=0.05)
        assert book.value("r3", 40.0) == 0.0
        return
    assert book.fleet_scale == pytest.approx(1.0)
    assert book.value("r3", 39.0) == pytest.approx(-1.5)  # k = 3: -(3 - 1 - 0.5)
    assert book.value("r0", 39.0) == 0.0
