"""The TinyServe objective: every term acts in the documented direction; w learns online."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from selector_helpers import cands, request

from cluster.selector.objective import ObjectiveConfig, TinyServeObjective
from cluster.selector.types import CandidateRow as Row
from cluster.selector.types import Outcome


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
    # softmax / max softmax: the best-matching candidate has U = 1, the others less
    assert t["utility"][0] == 1.0 and np.all(t["utility"][1:] < 1.0)
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
    # NOTE: locality = tier share x S (match_scaled_features): 1 x 1 and 0.5 x 0.5
    assert loc[0] == 1.0 and loc[1] == 0.5 * sim[1] == 0.25
    assert r.top(c, 1)[0].replica_id == "gpu"


def test_node_locality_needs_origin() -> None:
    p = TinyServeObjective()
    c = cands(_row("near", num_matched_blocks=4, same_node=True), _row("far", num_matched_blocks=4))
    with_origin = p.select(request(8, origin_node_id="n1"), c)
    # NOTE: 4 of 8 blocks matched: locality = node share x S = 1 x 0.5 and 0.5 x 0.5
    assert with_origin.terms["locality"][0] == 0.5 and with_origin.terms["locality"][1] == 0.25
    assert with_origin.top(c, 1)[0].replica_id == "near"
    without = p.select(request(8), c)
    assert without.terms["locality"][0] == without.terms["locality"][1]


def test_reward_is_an_additive_per_replica_term() -> None:
    p = TinyServeObjective(ObjectiveConfig(lambda_reward=0.5))
    c = cands(_row("a", reward=-0.6), _row("b", reward=-0.1))
    assert _winner(p, request(4), c) == "b"
    r = p.select(request(4), c)
    assert abs((r.scores[1] - r.scores[0]) - 0.5 * 0.5) < 1e-12
    off = TinyServeObjective(ObjectiveConfig(lambda_reward=0.0)).select(request(4), c)
    assert off.scores[0] == off.scores[1]


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


def test_hot_replica_with_long_queue_loses_to_idle_one_when_recompute_is_cheaper() -> None:
    """Load is the estimated-TTFT excess in seconds: a hot replica whose queue wait (30k tokens,
    1 s) exceeds the recompute it would save (128 tokens) loses to an idle replica."""
    cfg = ObjectiveConfig()
    p = TinyServeObjective(cfg)
    c = cands(_row("hot", num_matched_blocks=8, num_queued_tokens=30000, hotness=20.0),
              _row("idle"))
    r = p.select(request(8), c)
    assert r.top(c, 1)[0].replica_id == "idle"
    rate = cfg.prefill_tokens_per_s
    kappa = cfg.queued_token_weight
    np.testing.assert_allclose(r.terms["load_cost"], [kappa * 30000 / rate - 128 / rate, 0.0])
    assert r.terms["utility"][0] == 1.0 > r.terms["utility"][1]  # the cache still counts


def test_cached_replica_wins_when_its_wait_is_shorter_than_the_recompute_saved() -> None:
    """The trade-off lives in the cost itself: with the utility switched off (w = 0) a cached
    replica wins while its queue wait is below the recompute time it saves, and loses above."""
    p = TinyServeObjective(ObjectiveConfig(w=(0.0, 0.0, 0.0, 0.0), queued_token_weight=1.0))
    q = request(256)  # 4,096 prompt tokens, all cached on "cached"
    short = cands(_row("cached", num_matched_blocks=256, num_queued_tokens=1000), _row("idle"))
    long = cands(_row("cached", num_matched_blocks=256, num_queued_tokens=6000), _row("idle"))
    assert _winner(p, q, short) == "cached"
    assert _winner(p, q, long) == "idle"
    # pending inserts and host-tier blocks save less recompute than device-resident blocks
    est = p.ttft_estimate(q, cands(_row("gpu", num_matched_blocks=256),
                                   _row("host", num_matched_blocks=256, num_host_blocks=256),
                                   _row("pending", num_pending_blocks=256), _row("none")))
    assert est[0] < est[2] < est[3] and est[0] < est[1] < est[3]


def test_cache_versus_queue_decision_does_not_depend_on_cluster_size() -> None:
    """U is normalised by its maximum, not scaled by N: adding 128 idle cold replicas neither
    inflates the warm replica's utility nor flips the decision towards it."""
    p = TinyServeObjective(ObjectiveConfig(alpha_load=10.0, queued_token_weight=1.0))
    q = request(10)
    warm = _row("warm", num_matched_blocks=8, num_queued_tokens=6000)
    small = cands(warm, _row("cold"))
    large = cands(warm, *(_row(f"cold{i}") for i in range(128)))
    rs, rl = p.select(q, small), p.select(q, large)
    assert rs.terms["utility"][0] == rl.terms["utility"][0] == 1.0
    assert rs.top(small, 1)[0].replica_id == "cold"
    assert rl.top(large, 1)[0].replica_id.startswith("cold")
    light = cands(_row("warm", num_matched_blocks=8, num_queued_tokens=500),
                  *(_row(f"cold{i}") for i in range(128)))
    assert _winner(p, q, light) == "warm"


def test_placement_that_evicts_cached_kv_costs_its_recompute() -> None:
    """evict_token_weight: moving a cold context onto a replica full of cached KV displaces
    blocks that others must recompute later; the same move onto empty blocks costs nothing."""
    q = request(100, num_output_tokens=32)  # needs 100 + 2 blocks anywhere cold
    c = cands(_row("full", num_free_blocks=300, num_cached_blocks=250),  # 50 empty
              _row("empty", num_free_blocks=300), _row("cached_all", num_free_blocks=300,
                                                     num_cached_blocks=900))
    cfg = ObjectiveConfig(evict_token_weight=2.0)
    r = TinyServeObjective(cfg).select(q, c)
    per_token = 2.0 / cfg.prefill_tokens_per_s
    np.testing.assert_allclose(r.terms["load_cost"], [52 * 16 * per_token, 0.0, 102 * 16 * per_token])
    assert r.top(c, 1)[0].replica_id == "empty"
    off = TinyServeObjective(ObjectiveConfig(evict_token_weight=0.0)).select(q, c)
    np.testing.assert_allclose(off.terms["load_cost"], [0.0, 0.0, 0.0])


_rows = st.lists(
    st.builds(
        Row,
        replica_id=st.just("r"),
        num_matched_blocks=st.integers(0, 200),
        num_pending_blocks=st.integers(0, 50),
        num_host_blocks=st.integers(0, 30),
        hotness=st.sampled_from([0.0, 0.5, 3.0, 40.0]),
        block_size=st.sampled_from([0, 16, 32]),
        num_blocks=st.sampled_from([0, 100, 5000]),
        num_free_blocks=st.integers(0, 5000),
        num_cached_blocks=st.integers(0, 5000),
        num_queued_tokens=st.integers(-10, 100_000),
        ttft_ewma_s=st.sampled_from([0.0, 0.05, 3.0, 30.0]),
        f_total=st.sampled_from([0.0, 0.4, 9.0]),
        reward=st.sampled_from([0.0, 0.0, 0.3, 1.0]),
        same_node=st.booleans(),
        prefill_tokens_per_s=st.sampled_from([0.0, 0.0, 180.0, 29000.0]),
    ),
    min_size=0,
    max_size=40,
)
_configs = st.builds(
    ObjectiveConfig,
    lambda_reward=st.sampled_from([0.0, 0.5]),
    alpha_size=st.sampled_from([0.0, 0.7]),
    w=st.sampled_from([(2.0, 1.0, 4.0, 1.0), (0.0, 0.0, 1.0, 0.0), (1.0, 3.0, 0.0, 2.0)]),
    temperature=st.sampled_from([1.0, 0.3]),
    evict_token_weight=st.sampled_from([0.0, 2.0]),
    load_clip_s=st.sampled_from([60.0, 0.01]),
)


@settings(max_examples=300, deadline=None)
@given(
    rows=_rows,
    cfg=_configs,
    num_blocks=st.integers(0, 300),
    num_output_tokens=st.integers(0, 500),
    origin=st.sampled_from(["", "node-1"]),
)
def test_compiled_select_equals_the_numpy_definition(
    rows: list[Row], cfg: ObjectiveConfig, num_blocks: int, num_output_tokens: int, origin: str
) -> None:
    """``select`` (one compiled pass) gives ``select_reference``'s (numpy, term by term)
    scores, terms and order."""
    for i, r in enumerate(rows):
        r.replica_id = f"r{i}"
    c = cands(*rows)
    q = request(num_blocks, num_output_tokens=num_output_tokens, origin_node_id=origin)
    p = TinyServeObjective(cfg)
    got, want = p.select(q, c), p.select_reference(q, c)
    assert set(got.terms) == set(want.terms)
    for name in want.terms:
        np.testing.assert_allclose(got.terms[name], want.terms[name], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12, atol=1e-12)
    # NOTE: exp may differ by an ulp between numpy and numba: compare the order where scores
    # are not within rounding of each other.
    s = np.sort(want.scores)
    if len(s) < 2 or np.min(np.diff(s)) > 1e-9:
        assert got.order.tolist() == want.order.tolist()


def test_each_replica_is_charged_at_its_own_measured_rate() -> None:
    """The same queue costs a slow replica more seconds: its reported rate, not a constant."""
    p = TinyServeObjective()
    q = request(10)
    c = cands(
        _row("fast", num_queued_tokens=3000, prefill_tokens_per_s=30000.0),
        _row("slow", num_queued_tokens=3000, prefill_tokens_per_s=3000.0),
        _row("unreported", num_queued_tokens=3000),
    )
    load = p.select(q, c).terms["load_cost"]
    # (3000 queued + 160 own) tokens / rate, relative to the best: fast 0, configured rate 0,
    # slow 3160/3000 - 3160/30000 s.
    np.testing.assert_allclose(load, [0.0, 3160 / 3000 - 3160 / 30000, 0.0], rtol=1e-12)
    assert _winner(p, q, c) in ("fast", "unreported")


def test_cpu_rates_spread_a_shared_template_prefix() -> None:
    """Issue 20: at the H100 default rate a 2-block chat-template hit outweighs a busy queue
    and every request piles onto one replica; at the CPU rates the replicas report (~200
    tokens/s, SmolLM2) the same queue is seconds of wait and the idle replica wins."""
    p = TinyServeObjective()
    q = request(3, num_output_tokens=64)  # 48-token prompt, template in its first 2 blocks

    def pair(rate: float) -> object:
        return cands(
            _row("busy", num_matched_blocks=2, num_queued_tokens=300, prefill_tokens_per_s=rate),
            _row("idle", num_matched_blocks=0, prefill_tokens_per_s=rate),
        )

    assert _winner(p, q, pair(0.0)) == "busy"  # the configured (H100) rate stands in
    assert _winner(p, q, pair(200.0)) == "idle"
