"""Weight-sweep bookkeeping: configurations, scoring against the centre, combination."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import sweep_weights as sw
from benchmarks.routing_bench import _key, _spec_key, build_specs, parse_sets


def _row(tag: str, obj: dict, wl: str, seed: int, p99: float, hit: float) -> dict:
    return {"tag": tag, "objective_overrides": obj, "workload": wl, "num_replicas": 8,
            "seed": seed, "ttft_p99_s": p99, "hit_ratio": hit}


def test_configs_are_unique_and_vary_one_axis() -> None:
    cfgs = sw.configs()
    labels = [label for label, _ in cfgs]
    assert labels[0] == "centre" and len(set(labels)) == len(labels)
    for label, cfg in cfgs[1:]:
        axis = label.split("=")[0]
        assert {k for k in cfg if cfg[k] != sw.CENTRE.get(k)} == {axis}


def test_score_is_relative_to_centre_and_filters_hit_losers() -> None:
    rows = []
    for seed in (0, 1):
        rows += [_row("centre", sw.CENTRE, "a", seed, 1.0, 0.80),
                 _row("alpha_load=100.0", {**sw.CENTRE, "alpha_load": 100.0}, "a", seed, 0.5, 0.79),
                 _row("alpha_size=0.0", {**sw.CENTRE, "alpha_size": 0.0}, "a", seed, 0.25, 0.70)]
    table = {t["tag"]: t for t in sw.score(rows)}
    assert table["centre"]["ttft_p99_ratio_geomean"] == pytest.approx(1.0)
    assert table["alpha_load=100.0"]["ttft_p99_ratio_geomean"] == pytest.approx(0.5)
    assert not table["alpha_size=0.0"]["eligible"]  # 10 points of hits lost
    best = sw.combine(list(table.values()))
    assert best["alpha_load"] == 100.0 and "alpha_size" not in best


def test_routing_bench_specs_and_reuse_keys_agree() -> None:
    args = argparse.Namespace(workloads=["toolbench"], policies=["tinyserve", "round_robin"],
                              sizes=[8], seeds=[0, 1], objective="", set=["toolbench.rate=5"],
                              event_lag=0.02, snapshot_interval=0.05, calibration="x.json",
                              load_metric="uncached_work", share_in_step="on")
    specs = build_specs(args)
    assert len(specs) == 4
    row = {"workload": "toolbench", "policy": "round_robin", "num_replicas": 8, "seed": 1,
           "workload_overrides": {"rate": 5}, "objective_overrides": {},
           "sim_overrides": {"event_lag_s": 0.02, "snapshot_interval_s": 0.05,
                             "load_metric": "uncached_work", "share_in_step": True}}
    assert _key(row) in {_spec_key(s) for s in specs}
    # a row simulated with other engine semantics (earlier sessions) is not reused
    old = dict(row, sim_overrides={k: v for k, v in row["sim_overrides"].items()
                                   if k != "share_in_step"} | {"defer_shared_prefill": True})
    assert _key(old) not in {_spec_key(s) for s in specs}
    assert parse_sets(["toolbench.zipf=1.2"]) == {"toolbench": {"zipf": 1.2}}
    with pytest.raises(SystemExit):
        parse_sets(["nope.rate=1"])


def test_best_is_a_measured_configuration_not_a_mix_of_axis_winners() -> None:
    """alpha_load and queued_token_weight both scale the queue term: two axis winners are not
    combined into a configuration no run measured."""
    rows = []
    for seed in (0, 1):
        rows += [_row("centre", sw.CENTRE, "a", seed, 1.0, 0.80),
                 _row("alpha_load=3.0", {**sw.CENTRE, "alpha_load": 3.0}, "a", seed, 0.8, 0.80),
                 _row("queued_token_weight=0.5", {**sw.CENTRE, "queued_token_weight": 0.5}, "a",
                      seed, 0.9, 0.80)]
    best = sw.combine(sw.score(rows))
    assert best == {**sw.CENTRE, "alpha_load": 3.0}
    # nothing eligible -> the centre
    assert sw.combine([{"eligible": False, "ttft_p99_ratio_geomean": 0.1, "objective": {}}]) == sw.CENTRE
