"""scale_run: request-count overrides and a tiny end-to-end run without per-request records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import scale_run
from benchmarks.workloads import build_workload


@pytest.mark.parametrize("workload", sorted(scale_run.REQUEST_KNOB))
@pytest.mark.parametrize(("requests", "scale"), [(300, 1.0), (500, 2.0)])
def test_request_overrides_give_at_least_the_asked_count(workload: str, requests: int,
                                                         scale: float) -> None:
    w = build_workload(workload, 0, scale, **scale_run.request_overrides(workload, requests, scale))
    assert requests <= len(w) < requests + 16 * scale + 1


def test_tiny_run_writes_figures_and_times(tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert scale_run.main(["--workload", "prefix_repetition", "--replicas", "8", "--requests",
                           "60", "--policy", "round_robin", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["num_requests"] == doc["summary"]["num_requests"] == 60
    assert doc["sim_wall_s"] > 0 and doc["sim_cpu_s"] > 0 and doc["peak_rss_gib"] > 0
    assert 0 < doc["summary"]["ttft_p50_s"] <= doc["summary"]["ttft_p99_s"]
    assert "60 requests" in out.with_suffix(".md").read_text()
