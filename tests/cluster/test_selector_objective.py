"""The TinyServe objective: every term acts in the documented direction; w learns online."""

from __future__ import annotations

import numpy as np
from selector_helpers import cands, request

from cluster.objective import (
    ObjectiveConfig,
    TinyServeObjective,
    discounted_reward,
    realised_reward,
)
from cluster.types import CandidateRow as Row
from cluster.types import Outcome


def _row(rid: str, **kw: object) -> Row:
    base: dict[str, object] = {"num_blocks": 1000, "num_free_blocks": 800, "block_size": 16}
    base.update(kw)
    return Row(rid, **base)  # type: ignore[arg-type]


def _winner(p: TinyServeObjective, q: object, c: object) -> str:
    return p.select(q, c).top(c, 1)[0].replica_id  # type: ignore[arg-type]


def test_score_is_lambda_combination_of_terms() -> None:
    cfg = ObjectiveConfig(lambda_utility=1.3, lambda_cost=0.7, lambda_reward=0.4)
    p = TinyServeObjective(cfg)
    c = cands(
        _row(
            "a",
            num_matched_blocks=6,
            num_queued_tokens=3000,
            reward=0.5,
            ttft_ewma_s=0.2,
            f_total=0.3,
        ),
        _row("b", num_matched_blocks=1, num_queued_tokens=100, hotness=3.0),
        _row("c", num_free_blocks=2),
    )
    r = p.select(request(10), c)
    t = r.terms
    np.testing.assert_allclose(r.scores, 1.3 * t["utility"] - 0.7 * t["cost"] + 0.4 * t["reward"])
    cost = (
        cfg.alpha_size * t["size_cost"]
        + cfg.alpha_load * t["load_cost"]
        + cfg.alpha_latency * t["latency_cost"]
        + cfg.alpha_fragmentation * t["fragmentation_cost"]
    )
    np.testing.assert_allclose(t["cost"], cost)
    assert abs(t["utility"].sum() - 3.0) < 1e-9  # N * softmax sums to N
    assert t["size_cost"][2] > t["size_cost"][1]  # 2 free blocks cannot hold the request
    assert t["frequency"][1] > 0 == t["frequency"][0]


def test_cache_affinity_wins_at_equal_load() -> None:
    p = TinyServeObjective()
    c = cands(_row("cold"), _row("warm", num_matched_blocks=6), _row("hot", num_matched_blocks=9))
    assert _winner(p, request(10), c) == "hot"


def test_load_overrides_cache_when_deep_enough() -> None:
    p = TinyServeObjective()
    q = request(10)
    light = cands(_row("cold"), _row("warm", num_matched_blocks=8, num_queued_tokens=2000))
    heavy = cands(_row("cold"), _row("warm", num_matched_blocks=8, num_queued_tokens=60000))
    assert _winner(p, q, light) == "warm"
    assert _winner(p, q, heavy) == "cold"


def test_complexity_acts_through_similarity() -> None:
    """Same matched fraction: a long prompt's cache hit is worth more than a short one's."""
    p = TinyServeObjective()
    short = p.select(request(4), cands(_row("a", num_matched_blocks=2), _row("b")))
    long = p.select(request(128), cands(_row("a", num_matched_blocks=64), _row("b")))
    assert short.terms["similarity"][0] == long.terms["similarity"][0] == 0.5
    assert long.terms["complexity"][0] > short.terms["complexity"][0] > 0
    gap = lambda r: r.terms["utility"][0] - r.terms["utility"][1]  # noqa: E731
    assert gap(long) > gap(short) > 0
    # with no match on either candidate the complexity feature is 0 for both: it cancels
    none = p.select(request(128), cands(_row("a"), _row("b")))
    assert np.all(none.terms["complexity"] == 0)


def test_host_tier_and_pending_weigh_less_than_device_blocks() -> None:
    p = TinyServeObjective()
    c = cands(
        _row("gpu", num_matched_blocks=8),
        _row("host", num_matched_blocks=8, num_host_blocks=8),
        _row("pending", num_pending_blocks=8),
    )
    r = p.select(request(8), c)
    sim, loc = r.terms["similarity"], r.terms["locality"]
    assert sim[0] > sim[2] > 0 and sim[0] > sim[1] > 0
    assert loc[0] == 1.0 and loc[1] == 0.5
    assert r.top(c, 1)[0].replica_id == "gpu"


def test_node_locality_needs_origin() -> None:
    p = TinyServeObjective()
    c = cands(_row("near", num_matched_blocks=4, same_node=True), _row("far", num_matched_blocks=4))
    with_origin = p.select(request(8, origin_node_id="n1"), c)
    assert with_origin.terms["locality"][0] == 1.0 and with_origin.terms["locality"][1] == 0.5
    assert with_origin.top(c, 1)[0].replica_id == "near"
    without = p.select(request(8), c)
    assert without.terms["locality"][0] == without.terms["locality"][1]


def test_reward_breaks_ties_and_is_discounted() -> None:
    p = TinyServeObjective(ObjectiveConfig(lambda_reward=0.5))  # NOTE: off by default (sweep)
    c = cands(_row("a", reward=0.1), _row("b", reward=0.6))
    assert _winner(p, request(4), c) == "b"
    # newest first: (1.0 hit), (0.5 miss), (0.5 hit); gamma 0.5 -> (1 + 0 + 0.25*0.5) / 1.75
    assert (
        abs(discounted_reward([(1.0, True), (0.5, False), (0.5, True)], 0.5) - 1.125 / 1.75) < 1e-12
    )
    assert discounted_reward([], 0.9) == 0.0
    r, hit = realised_reward(
        Outcome("q", "a", 100, 50, ttft_s=1.0), ObjectiveConfig(latency_ref_s=1.0)
    )
    assert hit and abs(r - 0.25) < 1e-12


def test_online_learning_moves_w_towards_rewarded_feature() -> None:
    p = TinyServeObjective(ObjectiveConfig(learn=True, learning_rate=0.5, w=(1.0, 0.5, 1.0, 0.5)))
    w0 = p.w.copy()
    for i in range(60):
        matched = 9 if i % 2 else 2
        c = cands(_row("warm", num_matched_blocks=matched), _row("cold"))
        q = request(10, request_id=f"q{i}")
        assert p.select(q, c).top(c, 1)[0].replica_id == "warm"
        # the realised cached ratio tracks the predicted similarity
        p.on_feedback(Outcome(f"q{i}", "warm", 160, matched * 16))
    assert p.w[2] > w0[2] and p.w[0] > w0[0]
    assert np.all(p.w >= 0) and np.all(p.w <= p.config.w_max)
    c = cands(_row("warm", num_matched_blocks=8), _row("cold"))
    # without learn=True feedback is ignored
    frozen = TinyServeObjective()
    frozen.select(request(10, request_id="x"), c)
    frozen.on_feedback(Outcome("x", "warm", 160, 160))
    np.testing.assert_array_equal(frozen.w, np.asarray(ObjectiveConfig().w))
