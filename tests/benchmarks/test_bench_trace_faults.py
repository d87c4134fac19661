"""Issue 20 in the simulator: trace files, per-request records, seeds, offered load and
utilisation, fault scenarios (slow replicas, lossy KV events) and R(c) acting on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.routing_bench import main as routing_main
from benchmarks.sim.calibration import load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig
from benchmarks.sim.scenarios import resolve, speed_at
from benchmarks.workloads import build_workload, load_trace
from cluster.selector.objective import ObjectiveConfig

MODEL = load_calibration()


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_trace_tokens_and_blocks_share_prefixes_like_the_pool(tmp_path: Path) -> None:
    system = list(range(100, 132))  # two full blocks
    rows: list[dict[str, object]] = [
        {"arrival_s": 0.5, "session_id": "a", "prompt_token_ids": [*system, 1, 2, 3],
         "num_output_tokens": 20},
        {"arrival_s": 0.0, "prompt_token_ids": [*system, 4], "num_output_tokens": 1},
        {"arrival_s": 1.0, "prompt_block_ids": [7, 7, 9], "num_output_tokens": 16,
         "request_id": "x"},
    ]  # fmt: skip
    w = load_trace(_write(tmp_path / "t.jsonl", rows))
    assert [r.request_id for r in w.requests] == ["t2", "t1", "x"]  # sorted by arrival
    t2, t1, x = w.requests
    assert t1.prompt_blocks[:2] == t2.prompt_blocks[:2]  # equal token blocks, one content id
    assert t1.prompt_blocks[2] != t2.prompt_blocks[2]  # partial tails never shared
    assert len(t1.prompt_blocks) == 3 and len(t1.output_blocks) == 2 and t1.session_id == "a"
    assert x.prompt_blocks == (7, 7, 9) and min(t1.prompt_blocks) > 9  # no id collisions
    # the same trace through the real simulator: the second request hits the shared blocks
    sim = ClusterSim(SimConfig(1, "round_robin", MODEL, num_blocks=256), w)
    sim.run()
    cached = {r.request_id: r.num_cached_tokens for r in sim.records}
    assert cached == {"t2": 0, "t1": 32, "x": 0}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt_block_ids": [1], "num_output_tokens": 1}, "arrival_s"),
        ({"arrival_s": 0, "num_output_tokens": 1}, "exactly one"),
        ({"arrival_s": 0, "prompt_block_ids": [1], "prompt_token_ids": [1],
          "num_output_tokens": 1}, "exactly one"),
        ({"arrival_s": 0, "prompt_block_ids": [], "num_output_tokens": 1}, "non-empty"),
        ({"arrival_s": -1, "prompt_block_ids": [1], "num_output_tokens": 1}, ">= 0"),
        ({"arrival_s": 0, "prompt_block_ids": [1], "num_output_tokens": 0}, ">= 1"),
    ],
)
def test_trace_schema_errors_name_the_line(
    tmp_path: Path, row: dict[str, object], message: str
) -> None:
    good = {"arrival_s": 0, "prompt_block_ids": [1], "num_output_tokens": 1}
    path = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError, match=message) as exc:
        load_trace(path)
    assert "bad.jsonl:2" in str(exc.value)


def test_routing_bench_replays_a_trace_and_writes_records(tmp_path: Path) -> None:
    rows = [{"arrival_s": 0.01 * i, "session_id": f"s{i % 3}",
             "prompt_block_ids": [1000 + i % 3] * 4 + [i + 1], "num_output_tokens": 8}
            for i in range(30)]  # fmt: skip
    trace = _write(tmp_path / "mine.jsonl", rows)
    out = tmp_path / "res"
    rc = routing_main(["--trace", str(trace), "--policies", "tinyserve", "power_of_two",
                       "--sizes", "2", "--records", str(tmp_path / "rec"), "--out", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert {r["workload"] for r in doc["runs"]} == {"trace:mine.jsonl"}
    for run in doc["runs"]:
        recs = [json.loads(x) for x in Path(run["records_file"]).read_text().splitlines()]
        assert len(recs) == 30 and {r["request_id"] for r in recs} == {f"t{i}" for i in range(1, 31)}
        assert all(r["ttft_s"] == r["first_token_s"] - r["arrival_s"] >= 0 for r in recs)
        # offered load: 30 requests over 0.29 s; 5 blocks x 16 + 8 tokens each
        assert run["offered_load_req_s"] == pytest.approx(30 / 0.29)
        assert run["offered_load_tok_s"] == pytest.approx(30 * 88 / 0.29)
        assert 0.0 < run["cluster_utilization"] <= 1.0


def _gsp(**kw: object):
    params = dict(num_groups=6, prompts_per_group=8, system_prompt_len=512, question_len=64,
                  output_len=32, rate=40.0)
    params.update(kw)
    return build_workload("generated_shared_prefix", 0, **params)


def test_seed_reaches_power_of_two() -> None:
    w = _gsp()
    picks = {}
    for seed in (0, 0, 1):
        sim = ClusterSim(SimConfig(4, "power_of_two", MODEL, num_blocks=2048, seed=seed), w)
        sim.run()
        picks.setdefault(seed, []).append([r.replica_id for r in sim.records])
    assert picks[0][0] == picks[0][1]  # same seed: same decisions
    assert picks[0][0] != picks[1][0]


def test_utilization_tells_a_loaded_run_from_a_saturated_one() -> None:
    light = ClusterSim(SimConfig(4, "round_robin", MODEL, num_blocks=2048), _gsp(rate=5.0)).run()
    heavy = ClusterSim(SimConfig(4, "round_robin", MODEL, num_blocks=2048),
                       _gsp(rate=5000.0)).run()  # fmt: skip
    assert heavy.offered_load_req_s > 100 * light.offered_load_req_s
    assert light.cluster_utilization < 0.5 < heavy.cluster_utilization


def test_scenarios_resolve() -> None:
    h = resolve("hetero", 8, 10.0)
    assert [w.index for w in h.slow] == [3, 7] and all(w.speed == 0.5 for w in h.slow)
    s = resolve("slowdown", 8, 10.0)
    win = s.speed_windows(0)
    assert speed_at(win, 2.0) == 1.0 and speed_at(win, 3.0) == pytest.approx(1 / 3)
    assert speed_at(win, 6.5) == 1.0 and s.speed_windows(1) == []
    assert resolve("lossy_events", 8, 10.0).drop_probability(0) == 0.1
    with pytest.raises(ValueError, match="unknown scenario"):
        resolve("nope", 8, 1.0)


def test_slow_replicas_take_longer_and_report_nominal_rates() -> None:
    w = _gsp()
    base = ClusterSim(SimConfig(4, "round_robin", MODEL, num_blocks=2048), w)
    base.run()
    slow = ClusterSim(SimConfig(4, "round_robin", MODEL, num_blocks=2048, scenario="hetero"), w)
    slow.run()
    # round-robin sends the same requests to r003 in both runs; they take longer when slow
    ttft = {r.request_id: r.ttft_s for r in base.records if r.replica_id == "r003"}
    slow_ttft = {r.request_id: r.ttft_s for r in slow.records if r.replica_id == "r003"}
    assert np.mean(list(slow_ttft.values())) > 1.5 * np.mean(list(ttft.values()))
    rates = [r.snapshot().prefill_tokens_per_s for r in slow.replicas]
    assert rates[3] > 0.8 * rates[0]  # slower than it reports
    told = ClusterSim(SimConfig(4, "round_robin", MODEL, num_blocks=2048, scenario="hetero",
                                scenario_reported=True), w)  # fmt: skip
    told.run()
    told_rates = [r.snapshot().prefill_tokens_per_s for r in told.replicas]
    # the fit sees the half speed in the steps r003 runs most (decode): ~2x the healthy one's
    fast, slow_fit = told.replicas[0].rates.coefficients(), told.replicas[3].rates.coefficients()
    assert slow_fit.step_time(0, 2) > 1.6 * fast.step_time(0, 2)
    # NOTE: the reported rate only partly (0.87x here, ~100 steps of r003): the start-up
    # probe's 8,192-token prefill weighs ~750 of r003's ~300-token steps in the fit and holds
    # c_p at its nominal value until it fades (replicas/rate_meter.py); only the fixed cost moved.
    assert told_rates[3] < 0.92 * told_rates[0]


def test_lossy_events_lose_about_a_tenth_of_one_replicas_block_events() -> None:
    w = _gsp()
    sim = ClusterSim(SimConfig(4, "tinyserve", MODEL, num_blocks=2048, scenario="lossy_events"), w)
    s = sim.run()
    assert s.num_requests == len(w.requests)
    assert sim.num_dropped_events > 0 and s.extra["num_dropped_events"] == sim.num_dropped_events


def test_reward_moves_traffic_off_a_replica_slower_than_it_reports() -> None:
    """Real pools, real core, real Feedback: with R on, the half-speed replicas (which report
    healthy rates) get fewer requests than with R off."""
    w = _gsp(num_groups=12, prompts_per_group=8, rate=120.0)
    share = {}
    for lam in (0.0, 10.0):
        cfg = SimConfig(8, "tinyserve", MODEL, num_blocks=4096, scenario="hetero",
                        objective=ObjectiveConfig(lambda_reward=lam))  # fmt: skip
        sim = ClusterSim(cfg, w)
        sim.run()
        slow = sum(1 for r in sim.records if r.replica_id in ("r003", "r007"))
        share[lam] = slow / len(sim.records)
    assert share[10.0] < share[0.0]
