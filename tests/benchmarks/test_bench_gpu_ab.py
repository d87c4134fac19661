"""gpu_ab's pure parts (TPOT, table, replay plan) and gpu_ab_sim: a gpu_ab replay whose records
ARE the simulator's run agrees exactly, and Ray's router (no simulator model) is skipped."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from benchmarks.gpu_ab import PLAN, POLICIES, table, tpot
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
    md = table([{"workload": "w", "policy": "p", "num_requests": 3, "ttft_p50_s": 0.25}])
    assert "| w | p | 3 |" in md and "0.250" in md


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
