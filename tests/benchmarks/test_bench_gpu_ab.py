"""gpu_ab's pure parts (TPOT, tables, GPU sharing, seeds, the time budget) and gpu_ab_sim: a gpu_ab replay whose records
ARE the simulator's run agrees exactly, and Ray's router (no simulator model) is skipped."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from benchmarks.gpu_ab import LLAMA_1B, PLAN, POLICIES, tpot
from benchmarks.gpu_ab_plan import Budget, gpu_plan, kv_fit, replay_plan
from benchmarks.gpu_ab_report import mean_rows, mean_table, table
from benchmarks.gpu_ab_sim import SIM_POLICY, as_loadgen
from benchmarks.gpu_ab_sim import main as sim_main
from benchmarks.loadgen import LoadRecord
from benchmarks.sim.calibration import DEFAULT_CALIBRATION, load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig
from benchmarks.sim_vs_real import METRICS, compare, replayed_workload

GSP = {"num_groups": 2, "prompts_per_group": 4, "system_prompt_len": 256, "question_len": 32,
       "output_len": 16, "rate": 4.0}


def test_tpot_skips_errors_and_single_token_answers() -> None:
    recs = [LoadRecord("a", 0.0, 1.0, 2.0, 10, 0, 11),       # 0.1 s per token after the first
            LoadRecord("b", 0.0, 1.0, 4.0, 10, 0, 4),        # 1.0 s
            LoadRecord("c", 0.0, 1.0, 9.0, 10, 0, 1),        # one token: no TPOT
            LoadRecord("d", 0.0, 1.0, 9.0, 10, 0, 5, "boom")]
    t = tpot(recs)
    assert t["tpot_p50_s"] == pytest.approx(0.55) and t["tpot_p90_s"] == pytest.approx(0.91)
    assert tpot([]) == {}


def test_every_policy_maps_to_a_router_and_the_sim_knows_all_but_rays() -> None:
    routers = {r for r, _ in POLICIES.values()}
    assert routers == {"tinyserve", "prefix_cache_affinity", "pow2"}
    assert set(POLICIES) - set(SIM_POLICY) == {"ray_prefix_affinity"}
    assert set(PLAN) == {"generated_shared_prefix", "multi_turn_chat", "tool_agent", "b2b_saas"}
    md = table([{"workload": "w", "policy": "p", "seed": 1, "num_requests": 3,
                 "ttft_p50_s": 0.25}])
    assert "| w | p | 1 | 3 |" in md and "0.250" in md


def _ab_run(policy: str) -> dict[str, Any]:
    """A gpu_ab replay whose records are the simulator's own run (a perfect calibration)."""
    args = {"workload": "generated_shared_prefix", "seed": 0, "scale": 1.0, "time_scale": 0.5,
            "set": GSP, "max_requests": 0}
    w = replayed_workload(as_loadgen({"args": args, "records": []}))
    sim = ClusterSim(SimConfig(num_replicas=2, policy=SIM_POLICY.get(policy, "round_robin"),
                               model=load_calibration(), num_blocks=512, eviction="lru"), w)
    sim.run()
    recs = [asdict(LoadRecord(r.request_id, r.arrival_s, r.first_token_s, r.finish_s,
                            r.num_prompt_tokens, r.num_cached_tokens, r.num_output_tokens))
            for r in sim.records]
    return {"summary": {"workload": "generated_shared_prefix", "policy": policy},
            "args": args, "records": recs}


def test_gpu_ab_replay_equal_to_the_simulation_agrees_and_rays_is_skipped(
        tmp_path: Path) -> None:
    run = _ab_run("pow2")
    lg = as_loadgen(run)
    assert lg["args"]["set"][0] == "num_groups=2"
    row = compare(lg, SimConfig(num_replicas=2, policy="power_of_two", model=load_calibration(),
                                num_blocks=512, eviction="lru"))
    for m in METRICS:
        assert row["sim"][m] == pytest.approx(row["real"][m], rel=1e-9), m
    ab = {"num_replicas": 2, "gpu": "test", "engine": {"num_blocks": 512, "eviction": "lru"},
          "runs": [run, _ab_run("ray_prefix_affinity")]}
    (tmp_path / "ab.json").write_text(json.dumps(ab))
    cal = str(DEFAULT_CALIBRATION)
    assert sim_main(["--ab", str(tmp_path / "ab.json"), "--calibration", cal,
                     "--out", str(tmp_path / "cmp")]) == 0
    out = json.loads((tmp_path / "cmp.json").read_text())
    assert [r["policy"] for r in out["runs"]] == ["pow2"]
    assert "| generated_shared_prefix | pow2 |" in (tmp_path / "cmp.md").read_text()


def test_replicas_share_the_gpus_in_whole_fractions_ray_can_place() -> None:
    one = gpu_plan(2, 2)
    assert one["num_gpus_per_replica"] == 1.0 and one["replicas_per_gpu"] == 1
    assert one["gpus_used"] == 2 and gpu_plan(2, 8)["gpus_used"] == 2
    shared = gpu_plan(2, 1)
    assert shared["num_gpus_per_replica"] == 0.5 and shared["replicas_per_gpu"] == 2
    # 3 replicas on 2 GPUs: 0.67 each would not fit two to a GPU; 0.5 does.
    assert gpu_plan(3, 2)["num_gpus_per_replica"] == 0.5
    for n in (3, 4, 6, 7):
        p = gpu_plan(n, 1)
        assert p["num_gpus_per_replica"] * n <= 1.0 and p["replicas_per_gpu"] == n
    with pytest.raises(ValueError):
        gpu_plan(2, 0)


def test_the_h200_runs_kv_pool_fits_two_to_four_1b_replicas_on_one_h100() -> None:
    arch = dict(LLAMA_1B, vocab_size=49_152, tie_word_embeddings=True)
    h100 = 80 * 10**9 - 800 * 2**20
    per_block = 2 * 16 * 8 * 64 * 16 * 2  # K and V, 16 layers, 8 KV heads of 64, bf16
    for k in (2, 3, 4):
        fit = kv_fit(19_521, k, h100, arch)
        assert fit["fits"] and fit["kv_bytes_per_block"] == per_block == 512 * 1024
        assert fit["max_blocks"] >= 19_521
        # the fit is exact at max_blocks and one block more does not fit
        assert kv_fit(fit["max_blocks"], k, h100, arch)["fits"]
        assert not kv_fit(fit["max_blocks"] + 100, k, h100, arch)["fits"]
    assert 1.9e9 < kv_fit(1, 2, h100, arch)["weights_bytes"] < 2.4e9  # ~1.07B params
    assert not kv_fit(19_521, 6, h100, arch)["fits"]


def test_seeds_run_seed_major_within_each_deployment() -> None:
    plan = replay_plan({"tinyserve": ["tinyserve", "dynamo_cost"], "pow2": ["pow2"]},
                       ["tool_agent", "b2b_saas"], [0, 1])
    assert [r for r, _ in plan] == ["tinyserve", "pow2"]
    ts = plan[0][1]
    assert len(ts) == 8 and ts[:4] == [(0, "tool_agent", "tinyserve"),
                                       (0, "tool_agent", "dynamo_cost"),
                                       (0, "b2b_saas", "tinyserve"), (0, "b2b_saas", "dynamo_cost")]
    assert {s for s, _, _ in ts[4:]} == {1}
    assert plan[1][1] == [(0, "tool_agent", "pow2"), (0, "b2b_saas", "pow2"),
                          (1, "tool_agent", "pow2"), (1, "b2b_saas", "pow2")]


def test_the_budget_splits_time_by_replays_and_stops_replays_that_would_overrun() -> None:
    now = [0.0]
    b = Budget(100.0, clock=lambda: now[0])
    assert b.allows("w")  # no deadline yet, nothing known
    now[0] = 10.0  # the first deployment took 10 s; 2 later ones keep 10 s each
    b.open_deployment(replays=4, later_replays=4, later_deployments=2, deploy_s=10.0)
    assert b.deadline == pytest.approx(10.0 + (100 - 10 - 20) * 0.5)  # 45
    assert b.allows("w")  # unknown cost: assumed to fit
    b.record("w", 20.0)
    now[0] = 25.0
    assert b.allows("w")  # 25 + 20 = 45: fits exactly
    now[0] = 26.0
    assert not b.allows("w") and b.allows("other")
    b.record("w", 5.0)  # the estimate is the longest seen
    assert b.walls["w"] == 20.0
    now[0] = 55.0  # the last deployment: the whole rest of the budget
    b.open_deployment(replays=2, later_replays=0, later_deployments=0, deploy_s=10.0)
    assert b.deadline == pytest.approx(100.0)
    now[0] = 81.0
    assert not b.allows("w")
    free = Budget(0.0, clock=lambda: now[0])
    free.open_deployment(1, 1, 1, 1e9)
    free.record("w", 1e9)
    assert free.allows("w")


def test_mean_over_seeds_per_workload_and_policy() -> None:
    rows = [{"workload": "w", "policy": "p", "seed": 0, "num_requests": 10, "num_errors": 0,
             "ttft_p99_s": 1.0, "hit_ratio": 0.5},
            {"workload": "w", "policy": "p", "seed": 1, "num_requests": 12, "num_errors": 1,
             "ttft_p99_s": 2.0, "hit_ratio": 0.7},
            {"workload": "w", "policy": "q", "seed": 0, "num_requests": 5, "num_errors": 0,
             "ttft_p99_s": 3.0}]
    m = {r["policy"]: r for r in mean_rows(rows)}
    assert m["p"]["seeds"] == 2 and m["p"]["num_requests"] == 22 and m["p"]["num_errors"] == 1
    assert m["p"]["ttft_p99_s"] == pytest.approx(1.5) and m["p"]["hit_ratio"] == pytest.approx(0.6)
    assert m["q"]["seeds"] == 1 and "hit_ratio" not in m["q"]
    md = mean_table(rows)
    assert "| w | p | 2 | 22 | 1 |" in md and "1.500" in md


def test_pool_sampler_keeps_each_replicas_requests_in_flight_over_time() -> None:
    import time as _time

    from benchmarks.gpu_ab_replay import PoolSampler

    class _Call:
        def __init__(self, stats: Any) -> None:
            self.remote = stats

    class _Actor:
        """A replica whose requests in flight grow by one per snapshot (a queue building)."""

        def __init__(self, step: int) -> None:
            self.n, self.step = 0, step
            self.record_routing_stats = _Call(self._stats)

        def _stats(self) -> dict[str, Any]:
            self.n += self.step
            return {"num_inflight": self.n, "num_inflight_tokens": 1000 * self.n,
                    "kv_usage": 0.5, "prefix_query_tokens": 7 * self.n}

    actors = {"a": _Actor(1), "b": _Actor(0)}
    with PoolSampler(2, period_s=0.02, actors=actors, get=lambda st: st) as pools:
        _time.sleep(0.3)
    fig = pools.figures()
    tl = fig["timeline"]
    assert set(tl) == {"a", "b"} and len(tl["a"]) == len(tl["b"]) >= 5
    ts = [x[0] for x in tl["a"]]
    assert ts == sorted(ts) and 0 < ts[0] < ts[-1] < 1.0
    # NOTE: snapshot 1 is taken on entry (the "before" counters); the timeline starts at 2
    assert [x[1] for x in tl["a"]] == list(range(2, 2 + len(tl["a"])))
    assert all(x[2] == 1000 * x[1] for x in tl["a"]) and {x[1] for x in tl["b"]} == {0}
    assert fig["inflight_max"] == {"a": tl["a"][-1][1], "b": 0}
    assert fig["prompt_tokens_per_replica"]["b"] == 0
    json.dumps(fig)  # NOTE: it goes into the results JSON as is
