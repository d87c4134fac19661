"""``benchmarks.app_cluster`` starts Ray again after a node that missed Ray's 30 s startup
window (it happened once in CI), and only then: other failures go up at once."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from benchmarks import app_cluster
from benchmarks.app_cluster import AppSpec


def _starts(monkeypatch: pytest.MonkeyPatch, failures: list[Exception]) -> dict[str, Any]:
    seen: dict[str, Any] = {"starts": 0, "stops": []}

    def start(spec: AppSpec) -> tuple[Any, dict[str, Any]]:
        seen["starts"] += 1
        if failures:
            raise failures.pop(0)
        return "cluster", {"n1": "node"}

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen["stops"].append(cmd[-2:])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(app_cluster, "_start_ray", start)
    monkeypatch.setattr(subprocess, "run", run)
    return seen


STARTUP = Exception("The current node timed out during startup. This could happen ...")


def test_a_node_that_timed_out_is_stopped_and_started_again(monkeypatch):
    seen = _starts(monkeypatch, [STARTUP])
    assert app_cluster._start_ray_retrying(AppSpec(num_worker_nodes=1)) == (
        "cluster", {"n1": "node"})
    assert seen["starts"] == 2
    assert seen["stops"] == [["stop", "--force"]]


def test_the_last_try_s_failure_goes_up(monkeypatch):
    seen = _starts(monkeypatch, [STARTUP, STARTUP, STARTUP])
    with pytest.raises(Exception, match="timed out during startup"):
        app_cluster._start_ray_retrying(AppSpec(), attempts=3)
    assert seen["starts"] == 3 and len(seen["stops"]) == 2


def test_other_failures_are_not_retried(monkeypatch):
    seen = _starts(monkeypatch, [ValueError("bad resources")])
    with pytest.raises(ValueError, match="bad resources"):
        app_cluster._start_ray_retrying(AppSpec())
    assert seen["starts"] == 1 and seen["stops"] == []
