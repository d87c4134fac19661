"""benchmarks/grpc_after_answer.py: a real grpc.aio server on loopback answers every method
with the bytes it promises, and the run reports each method against Ping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import grpc_after_answer as gaa


def test_run_reports_every_method_against_ping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    assert gaa.main(["--work-us", "5", "--rounds", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["calls_per_method"] == 100
    assert set(got["p50_us"]) == set(gaa.METHODS)
    assert got["over_ping"]["Ping"] == 1.0
    assert all(v > 0 for v in got["p50_us"].values())
    assert "| After |" in capsys.readouterr().out
