"""selector_median: per-figure medians over selector_bench runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.selector_median import main, medians


def _run(x: float, scaling: dict[str, float]) -> dict[str, Any]:
    p = {"p50_us": x, "p99_us": 2 * x}
    cpu = {"server_cpu_us": x, "client_cpu_us": 3 * x}
    row = {
        "num_replicas": 256, "compute_core_cpu": p, "core_in_server": {"wall": p}, "ping": p,
        "select": p, "select_over_ping_p50": x / 100, "throughput_select_rps": 10 * x,
        "throughput_ping_rps": 20 * x, "throughput_cpu": {"select": cpu, "ping": cpu},
        "ingest_wire_events_per_s": 1000 * x, "rss_mb": x,
    }  # fmt: skip
    small = {**row, "num_replicas": 8, "rss_mb": -1.0}
    return {"results": [small, row], "issue19": {"scaling": scaling}}


def test_medians_take_the_largest_r_of_each_run(tmp_path: Path) -> None:
    runs = [_run(30.0, {"1": 1.0, "2": 0.5}), _run(10.0, {"1": 1.0}), _run(20.0, {"1": 1.0, "2": 0.7})]
    figs = medians(runs)
    assert figs["compute_p99_us"] == {"runs": [60.0, 20.0, 40.0], "median": 40.0}
    assert figs["rss_mb"]["median"] == 20.0  # R = 8 rows are ignored
    assert figs["select_client_cpu_us"]["median"] == 60.0
    assert figs["scaling_N2"]["runs"] == [0.5, 0.7] and figs["scaling_N2"]["median"] == pytest.approx(0.6)
    files = []
    for i, r in enumerate(runs):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(r))
    assert main([*map(str, files), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["figures"]["ping_rps_one_proc"]["median"] == 400.0
