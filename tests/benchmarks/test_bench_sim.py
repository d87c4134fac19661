"""Simulator invariants on tiny clusters: real pools, real routing code, every request done."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.sim.calibration import load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig, simulate
from benchmarks.sim.hashes import BlockHashMemo
from benchmarks.workloads import build_workload
from kvmanager.hashing import make_hasher

MODEL = load_calibration()


def _gsp(seed: int = 0, **kw: object):
    params = dict(num_groups=6, prompts_per_group=8, system_prompt_len=512, question_len=64,
                  output_len=32, rate=40.0)
    params.update(kw)
    return build_workload("generated_shared_prefix", seed, **params)


def _run(workload, policy: str, n: int = 4, **kw: object) -> ClusterSim:
    sim = ClusterSim(SimConfig(n, policy, MODEL, num_blocks=kw.pop("num_blocks", 2048), **kw),
                     workload)
    sim.summary = sim.run()  # type: ignore[attr-defined]
    return sim


def test_calibration_names_gpu_and_provenance_and_is_monotone() -> None:
    assert "H100" in MODEL.gpu and "DERIVED" in MODEL.provenance
    assert MODEL.step_time(0, 0, 0, 0) == 0.0
    assert MODEL.prefill_time(4096) > MODEL.prefill_time(2048) > MODEL.prefill_time(1024)
    assert MODEL.prefill_time(512, ctx_before=8192) > MODEL.prefill_time(512)
    assert MODEL.step_time(64, 64, 0, 64 * 2000) > MODEL.step_time(8, 8, 0, 8 * 2000)


def test_router_hashes_equal_the_pool_hasher() -> None:
    w = _gsp()
    hasher = make_hasher("fast")
    memo = BlockHashMemo(hasher, w.block_size, max_entries=50)
    for r in w.requests[:10]:
        assert memo.hashes(r.prompt_blocks) == hasher.external_hashes(
            r.token_ids()[: len(r.prompt_blocks) * w.block_size], w.block_size)


@pytest.mark.parametrize("policy", ["round_robin", "tinyserve"])
def test_every_request_completes_and_hits_come_from_the_pools(policy: str) -> None:
    w = _gsp()
    sim = _run(w, policy)
    s = sim.summary  # type: ignore[attr-defined]
    assert s.num_requests == len(w.requests) == len(sim.records)
    assert {r.request_id for r in sim.records} == {r.request_id for r in w.requests}
    for rec in sim.records:
        assert rec.arrival_s <= rec.first_token_s <= rec.finish_s
        assert 0 <= rec.num_cached_tokens < rec.num_prompt_tokens
    pool_hits = sum(r.pool.stats().prefix_hit_tokens for r in sim.replicas)
    if s.num_preemptions == 0:
        assert pool_hits == sum(rec.num_cached_tokens for rec in sim.records)
    for r in sim.replicas:
        r.pool.check_integrity()
        st = r.pool.stats()
        assert st.num_requests == 0 and st.num_used_blocks == 0
    assert sum(r.num_routed for r in sim.replicas) == len(w.requests)


def test_cache_aware_beats_round_robin_on_hit_ratio() -> None:
    w = _gsp(1)
    rr = _run(w, "round_robin").summary  # type: ignore[attr-defined]
    for policy in ("tinyserve", "sglang_cache_aware", "preble"):
        ours = _run(w, policy).summary  # type: ignore[attr-defined]
        assert ours.hit_ratio > rr.hit_ratio + 0.1, policy


def test_same_config_is_deterministic() -> None:
    w = _gsp(2)
    a = _run(w, "power_of_two").summary  # type: ignore[attr-defined]
    b = _run(w, "power_of_two").summary  # type: ignore[attr-defined]
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    for d in (da, db):
        d.pop("sim_wall_s")
    assert da == db


def test_small_pool_preempts_and_still_completes() -> None:
    w = _gsp(0, num_groups=3, rate=400.0, output_len=96)
    sim = _run(w, "round_robin", n=2, num_blocks=120)
    assert sim.summary.num_preemptions > 0  # type: ignore[attr-defined]
    assert len(sim.records) == len(w.requests)
    assert sim.summary.num_evicted_blocks > 0  # type: ignore[attr-defined]
    for r in sim.replicas:
        r.pool.check_integrity()


def test_closed_loop_turns_wait_for_their_parent() -> None:
    w = build_workload("multi_turn_chat", 0, num_clients=6, num_rounds=3, tokens_per_round=128,
                       output_len=32)
    sim = _run(w, "tinyserve")
    recs = {r.request_id: r for r in sim.records}
    for req in w.requests:
        if req.parent_id is not None:
            assert recs[req.request_id].arrival_s >= recs[req.parent_id].finish_s
    # later turns find their history on the replica the router picked
    later = [recs[r.request_id] for r in w.requests if r.parent_id is not None]
    assert np.mean([r.num_cached_tokens / r.num_prompt_tokens for r in later]) > 0.5


def test_speculative_inserts_route_followers_before_events_arrive() -> None:
    # NOTE: a 5 s event lag hides every KV event for the whole run: only the service's pending
    # inserts can tell a policy where a group's system prompt is being computed.
    w = _gsp(4, rate=10.0)

    def hit_ratio(spec: bool) -> float:
        sim = _run(w, "sglang_cache_aware", event_lag_s=5.0, pending_ttl_s=10.0,
                   speculative=spec)
        return sim.summary.hit_ratio  # type: ignore[attr-defined,no-any-return]

    assert hit_ratio(True) > hit_ratio(False) + 0.2


def test_siblings_colocated_in_one_step_share_its_blocks() -> None:
    w = build_workload("sibling_bursts", 0, num_problems=4, num_rounds=2, problem_len=512,
                       output_len=16)
    late = _run(w, "sglang_cache_aware", share_in_step=False).summary  # type: ignore[attr-defined]
    now = _run(w, "sglang_cache_aware").summary  # type: ignore[attr-defined]  (the default)
    assert late.hit_ratio < 0.2  # blocks hashed only after the step: siblings cannot share
    assert now.hit_ratio > late.hit_ratio + 0.3
    assert now.num_requests == late.num_requests == len(w.requests)
    assert now.ttft_mean_s < late.ttft_mean_s  # one prefill of the problem per burst, not four


def test_macro_steps_do_not_change_results_much() -> None:
    w = _gsp(3)
    one = simulate(SimConfig(4, "round_robin", MODEL, num_blocks=2048, max_macro_steps=1), w)
    many = simulate(SimConfig(4, "round_robin", MODEL, num_blocks=2048, max_macro_steps=32), w)
    assert many.hit_ratio == pytest.approx(one.hit_ratio, abs=0.02)
    assert many.ttft_mean_s == pytest.approx(one.ttft_mean_s, rel=0.15)
    assert many.makespan_s == pytest.approx(one.makespan_s, rel=0.05)


