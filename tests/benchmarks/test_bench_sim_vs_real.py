"""sim_vs_real on loadgen-shaped inputs: the replayed workload is loadgen's (truncation, time
scale), a "real" run that IS the simulator's agrees exactly, a slower one is flagged, and the
token matching carries the real counts into the simulated requests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from benchmarks.loadgen import LoadRecord, Replayer, summarize
from benchmarks.sim.calibration import load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig
from benchmarks.sim_vs_real import (
    METRICS,
    compare,
    main,
    real_figures,
    replayed_workload,
    token_matched,
)
from benchmarks.workloads import build_workload

GSP = {"num_groups": 2, "prompts_per_group": 4, "system_prompt_len": 256, "question_len": 32,
       "output_len": 16, "rate": 4.0}
CHAT = {"num_clients": 3, "num_rounds": 2, "tokens_per_round": 64, "output_len": 16}


def loadgen_args(workload: str, overrides: dict[str, Any], time_scale: float,
                 max_requests: int = 0) -> dict[str, Any]:
    """Exactly the keys of loadgen's ``vars(args)``."""
    return {"base_url": "http://127.0.0.1:8000/v1", "api_key": "EMPTY", "model": "m",
            "workload": workload, "seed": 0, "scale": 1.0, "time_scale": time_scale,
            "max_requests": max_requests,
            "set": [f"{k}={json.dumps(v)}" for k, v in overrides.items()], "out": "x.json"}


def sim_config() -> SimConfig:
    return SimConfig(num_replicas=2, policy="tinyserve", model=load_calibration())


def loadgen_json_from_sim(args: dict[str, Any], ttft_factor: float = 1.0) -> dict[str, Any]:
    """A loadgen output whose records are the simulator's own run of the replayed workload
    (TTFTs optionally stretched): what a perfectly calibrated simulator would predict."""
    w = replayed_workload({"args": args})
    sim = ClusterSim(sim_config(), w)
    sim.run()
    recs = [LoadRecord(r.request_id, r.arrival_s,
                       r.arrival_s + ttft_factor * (r.first_token_s - r.arrival_s), r.finish_s,
                       r.num_prompt_tokens, r.num_cached_tokens, r.num_output_tokens)
            for r in sim.records]
    return {"args": args, "summary": summarize(recs), "records": [asdict(r) for r in recs]}


def test_replayed_workload_matches_loadgen_truncation_and_time_scale() -> None:
    args = loadgen_args("multi_turn_chat", CHAT, time_scale=20.0, max_requests=5)
    w = replayed_workload({"args": args})
    spec = build_workload("multi_turn_chat", 0, 1.0, **CHAT)
    sent = Replayer(None, "m", spec, 20.0, 5).requests
    assert sorted(r.request_id for r in w.requests) == sorted(r.request_id for r in sent)
    by_id = {r.request_id: r for r in sent}
    for r in w.requests:
        assert r.arrival_s == pytest.approx(20.0 * by_id[r.request_id].arrival_s)
        assert r.think_time_s == pytest.approx(20.0 * by_id[r.request_id].think_time_s)
        assert r.prompt_blocks == by_id[r.request_id].prompt_blocks
    assert w.params["time_scale"] == 20.0


@pytest.mark.parametrize("workload,overrides", [("generated_shared_prefix", GSP),
                                                ("multi_turn_chat", CHAT)])
def test_a_real_run_equal_to_the_simulation_agrees_exactly(
        workload: str, overrides: dict[str, Any]) -> None:
    lg = loadgen_json_from_sim(loadgen_args(workload, overrides, time_scale=3.0))
    row = compare(lg, sim_config())
    for m in METRICS:
        assert row["sim"][m] == pytest.approx(row["real"][m], rel=1e-9), m
        assert row["diff_sim"][m] == {"rel_diff": pytest.approx(0.0, abs=1e-9), "flag": False}
    assert row["real"]["hit_ratio"] > 0.3  # the shared prefixes do hit
    assert row["num_requests"] == len(lg["records"])


def test_a_slower_real_run_is_flagged() -> None:
    lg = loadgen_json_from_sim(loadgen_args("generated_shared_prefix", GSP, 1.0), ttft_factor=2.0)
    row = compare(lg, sim_config())
    for m in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"):
        assert row["diff_sim"][m]["rel_diff"] == pytest.approx(-0.5, abs=1e-6)
        assert row["diff_sim"][m]["flag"]
    assert not row["diff_sim"]["hit_ratio"]["flag"]


def test_token_matching_uses_real_counts() -> None:
    args = loadgen_args("multi_turn_chat", CHAT, time_scale=1.0)
    w = replayed_workload({"args": args})
    bs = w.block_size
    assert all(len(r.output_blocks) == 1 for r in w.requests)  # 16 spec output tokens
    # "real" prompts carry 40 template tokens; real answers are 40 tokens (3 blocks)
    records = [{"request_id": r.request_id, "num_prompt_tokens": len(r.prompt_blocks) * bs + 40,
                "num_output_tokens": 40, "error": ""} for r in w.requests]
    wt, info = token_matched(w, records)
    assert info["header_blocks"] == 2  # round(40 / 16)
    assert info["real_output_tokens"] == 40 * len(w.requests)
    by_id = {r.request_id: r for r in wt.requests}
    header = wt.requests[0].prompt_blocks[:2]
    for spec in w.requests:
        r = by_id[spec.request_id]
        assert r.num_output_tokens == 40 and len(r.output_blocks) == 3
        assert r.output_blocks[0] == spec.output_blocks[0]
        assert r.arrival_s == spec.arrival_s and r.think_time_s == spec.think_time_s
        assert r.prompt_blocks[:2] == header
        if spec.parent_id is not None:  # history = parent's prompt + its (real-length) answer
            p = by_id[spec.parent_id]
            n = len(p.prompt_blocks) + len(p.output_blocks)
            assert r.prompt_blocks[:n] == p.prompt_blocks + p.output_blocks
            assert len(r.prompt_blocks) == len(spec.prompt_blocks) + 2 + 2  # header, longer answer
        else:
            assert r.prompt_blocks[2:] == spec.prompt_blocks
    # every simulated request still runs
    assert ClusterSim(sim_config(), wt).run().num_requests == len(w.requests)


def test_real_figures_skip_errors_like_loadgen() -> None:
    recs = [LoadRecord("a", 0.0, 1.0, 2.0, 100, 50, 10), LoadRecord("b", 1.0, 1.5, 3.0, 100, 0, 20),
            LoadRecord("c", 1.0, 9.0, 9.0, 0, 0, 0, error="boom")]
    fig = real_figures([asdict(r) for r in recs])
    ref = summarize(recs)
    for m in METRICS:
        assert fig[m] == pytest.approx(ref[m])
    assert fig["num_errors"] == 1 and fig["hit_ratio"] == pytest.approx(0.25)


def test_cli_writes_json_and_markdown(tmp_path: Path) -> None:
    paths = []
    for name, ov in (("generated_shared_prefix", GSP), ("multi_turn_chat", CHAT)):
        lg = loadgen_json_from_sim(loadgen_args(name, ov, 2.0), ttft_factor=1.5)
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(lg))
        paths.append(str(p))
    out = tmp_path / "svr"
    assert main(["--loadgen", *paths, "--calibration",
                 str(Path("benchmarks/sim/calibration/h100_llama31_8b_derived.json")),
                 "--replicas", "2", "--eviction", "lru", "--step-time-factor", "1", "3",
                 "--ttft-overhead-s", "0.5", "0", "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    gsp, chat = data["runs"]
    assert [gsp["workload"], chat["workload"]] == ["generated_shared_prefix", "multi_turn_chat"]
    assert data["meta"]["replicas"] == 2 and data["meta"]["eviction"] == "lru"
    assert data["meta"]["step_time_factors"] == [1.0, 3.0]
    assert chat["step_time_factor"] == 3.0 and gsp["ttft_overhead_s"] == 0.5
    # gsp: steps unscaled, +0.5 s on every TTFT
    for m in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s"):
        assert gsp["sim_scaled"][m] == pytest.approx(gsp["sim_tokens"][m] + 0.5)
    assert gsp["sim_scaled"]["throughput_tok_s"] == gsp["sim_tokens"]["throughput_tok_s"]
    # slower steps: later first tokens, never earlier
    assert chat["sim_scaled"]["ttft_p50_s"] > chat["sim_tokens"]["ttft_p50_s"]
    assert set(chat["diff_sim_scaled"]) == set(METRICS)
    md = out.with_suffix(".md").read_text()
    assert md.count("| TTFT p99 (s) |") == 2 and "**-33%**" in md
    assert md.count("x 3.00 | diff |") == 1 and md.count("x 1.00 + 0.50 s | diff |") == 1


def test_replayer_records_feed_sim_vs_real(tmp_path: Path) -> None:
    """A loadgen JSON produced by the real Replayer (fake streaming server) is accepted."""
    from test_bench_loadgen_report import FakeClient

    args = loadgen_args("multi_turn_chat", CHAT, time_scale=0.0)
    w = build_workload("multi_turn_chat", 0, 1.0, **CHAT)
    records = asyncio.run(Replayer(FakeClient(), "m", w, 0.0).run())
    lg = {"args": args, "summary": summarize(records), "records": [asdict(r) for r in records]}
    row = compare(json.loads(json.dumps(lg)), sim_config())
    assert row["real"]["num_requests"] == row["num_requests"] == len(w.requests)
    assert set(row["diff_sim_tokens"]) == set(METRICS)


def test_step_time_factor_scales_every_step() -> None:
    from benchmarks.sim_vs_real import scaled

    m = load_calibration()
    m2 = scaled(m, 2.5)
    for shape in ((1, 1, 0.0, 100), (512, 1, 512 * 256.0, 0), (40, 9, 32 * 700.0, 8000)):
        assert m2.step_time(*shape) == pytest.approx(2.5 * m.step_time(*shape))
    assert scaled(m, 1.0) is m and m2.kv_capacity_tokens == m.kv_capacity_tokens
