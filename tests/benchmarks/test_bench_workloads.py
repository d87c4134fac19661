"""Workload generators: determinism by seed and the shape each one promises."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.workloads import WORKLOADS, build_workload, workload_stats
from benchmarks.workloads.arrivals import arrival_times, inter_arrivals, staged_arrival_times

SMALL = {
    "generated_shared_prefix": dict(num_groups=4, prompts_per_group=4),
    "prefix_repetition": dict(num_prompts=64),
    "multi_turn_chat": dict(num_clients=8),
    "tool_agent": dict(num_sessions=40),
    "b2b_saas": dict(num_tenants=6, qps=(3.0, 6.0), stage_s=5.0),
    "toolbench": dict(num_requests=64),
    "long_doc_qa": dict(num_docs=3),
    "sibling_bursts": dict(num_problems=4, num_rounds=2),
}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_requests_other_seed_differs(name: str) -> None:
    a = build_workload(name, 3, **SMALL[name])
    b = build_workload(name, 3, **SMALL[name])
    c = build_workload(name, 4, **SMALL[name])
    assert a.requests == b.requests
    assert [r.arrival_s for r in a.requests] != [r.arrival_s for r in c.requests]
    arrivals = [r.arrival_s for r in a.requests]
    assert arrivals == sorted(arrivals)
    assert len({r.request_id for r in a.requests}) == len(a.requests)
    for r in a.requests:
        assert len(r.output_blocks) * a.block_size >= r.num_output_tokens
        assert r.parent_id is None or any(p.request_id == r.parent_id for p in a.requests)


def test_generated_shared_prefix_shape_matches_sglang_defaults() -> None:
    w = build_workload("generated_shared_prefix", 0)
    st = workload_stats(w)
    assert st.num_requests == 64 * 16 and st.num_sessions == 64
    assert st.mean_prompt_tokens == 2048 + 128 and st.mean_output_tokens == 256
    # first prompt of a group misses; the other 15 reuse the 128-block system prompt
    assert st.ideal_cache_ratio == pytest.approx(15 * 128 / (16 * 136))


def test_prefix_repetition_reuses_prefixes_only() -> None:
    w = build_workload("prefix_repetition", 1)
    st = workload_stats(w)
    n_pre = w.params["num_prefixes"]
    assert st.mean_prompt_tokens == 640 and st.num_sessions == n_pre
    assert st.ideal_cache_ratio == pytest.approx((1024 - n_pre) * 32 / (1024 * 40))


def test_multi_turn_history_grows_and_chains_parents() -> None:
    w = build_workload("multi_turn_chat", 0, num_clients=4)
    by_id = {r.request_id: r for r in w.requests}
    for r in w.requests:
        if r.parent_id is None:
            assert len(r.prompt_blocks) == 32
            continue
        p = by_id[r.parent_id]
        assert r.prompt_blocks[: len(p.prompt_blocks) + len(p.output_blocks)] == (
            p.prompt_blocks + p.output_blocks)
        assert len(r.prompt_blocks) == len(p.prompt_blocks) + len(p.output_blocks) + 32
    assert len(w.requests) == 4 * 5


def test_b2b_saas_kv_demand_and_qps_stages() -> None:
    w = build_workload("b2b_saas", 0, scale=0.5, stage_s=10.0)
    n = w.params["design_replicas"]
    demand = w.params["num_tenants"] * 375 + w.params["num_tenants"] * 5 * 75
    assert demand / (n * w.kv_blocks_per_replica) == pytest.approx(0.73, abs=0.01)
    times = np.asarray([r.arrival_s for r in w.requests])
    for t0, t1, qps in w.stages:
        count = ((times >= t0) & (times < t1)).sum()
        expected = qps * (t1 - t0)
        assert abs(count - expected) < 4 * np.sqrt(expected) + 1
    assert {len(r.prompt_blocks) for r in w.requests} == {375 + 75}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_agent_cache_ratio_near_mooncake(seed: int) -> None:
    st = workload_stats(build_workload("tool_agent", seed))
    assert 0.50 <= st.ideal_cache_ratio <= 0.66
    assert 5000 <= st.mean_prompt_tokens <= 12000


def test_long_doc_qa_documents_are_long_and_shared() -> None:
    w = build_workload("long_doc_qa", 0)
    st = workload_stats(w)
    assert st.num_sessions == 30
    assert 28_000 <= st.p50_prompt_tokens <= 36_200
    assert st.ideal_cache_ratio > 0.8


def test_sibling_bursts_arrive_together() -> None:
    w = build_workload("sibling_bursts", 0)
    groups: dict[str, set[float]] = {}
    for r in w.requests:
        groups.setdefault(r.session_id, set()).add(r.arrival_s)
    assert len(groups) == 16 * 8 and all(len(ts) == 1 for ts in groups.values())
    assert len(w.requests) == 16 * 8 * 4


def test_scale_multiplies_groups_and_rate() -> None:
    a = build_workload("toolbench", 0, num_requests=200)
    b = build_workload("toolbench", 0, scale=2.0, num_requests=200)
    assert len(b.requests) == 2 * len(a.requests)
    assert b.params["rate"] == pytest.approx(2 * a.params["rate"])


def test_gamma_arrivals_are_burstier_than_poisson_with_same_mean() -> None:
    rng = np.random.default_rng(0)
    pois = inter_arrivals(rng, 20000, 10.0, "poisson")
    gam = inter_arrivals(rng, 20000, 10.0, "gamma", gamma_shape=0.25)
    assert pois.mean() == pytest.approx(0.1, rel=0.05) and gam.mean() == pytest.approx(0.1, rel=0.05)
    assert pois.std() / pois.mean() == pytest.approx(1.0, abs=0.05)
    assert gam.std() / gam.mean() == pytest.approx(2.0, rel=0.1)
    times = arrival_times(rng, 5, 1.0)
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    with pytest.raises(ValueError):
        inter_arrivals(rng, 3, 1.0, "uniform")
    t, stages = staged_arrival_times(rng, [1.0, 5.0], 4.0)
    assert stages == [(0.0, 4.0, 1.0), (4.0, 8.0, 5.0)] and np.all(t < 8.0)


def test_unknown_workload_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        build_workload("nope")
