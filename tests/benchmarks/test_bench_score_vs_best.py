"""score_vs_best ranks objective configurations by TinyServe p99 / best baseline p99."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.score_vs_best import main, score


def _row(policy: str, seed: int, p99: float, hit: float, obj: dict[str, float] | None = None,
         workload: str = "toolbench") -> dict[str, object]:
    return {"workload": workload, "num_replicas": 8, "seed": seed, "policy": policy,
            "ttft_p99_s": p99, "hit_ratio": hit, "objective_overrides": obj or {}}


def test_ratios_use_the_best_baseline_per_cell(tmp_path: Path) -> None:
    rows = [
        _row("round_robin", 0, 2.0, 0.5), _row("preble", 0, 1.0, 0.8),
        _row("round_robin", 1, 1.0, 0.5), _row("preble", 1, 4.0, 0.9),
        _row("tinyserve", 0, 0.5, 0.8, {"a": 1.0}), _row("tinyserve", 1, 2.0, 0.85, {"a": 1.0}),
        _row("tinyserve", 0, 1.5, 0.7, {"a": 2.0}), _row("tinyserve", 1, 1.0, 0.9, {"a": 2.0}),
        _row("tinyserve", 0, 1.0, 0.7, {"a": 3.0}, workload="other"),  # no baseline: ignored
    ]
    best, second = score(rows)
    assert best["objective"] == {"a": 1.0}  # ratios 0.5 and 2.0: geomean 1.0
    assert best["geomean"] == pytest.approx(1.0)
    assert best["workloads"]["toolbench"]["worst"] == pytest.approx(2.0)
    assert best["workloads"]["toolbench"]["hit_gap_points"] == pytest.approx(-2.5)
    assert second["geomean"] == pytest.approx(1.5**0.5)  # ratios 1.5 and 1.0
    assert second["workloads"]["toolbench"]["worst"] == pytest.approx(1.5)
    src = tmp_path / "rows.partial.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(src), "--out", str(tmp_path / "s")]) == 0
    assert "geomean" in (tmp_path / "s.md").read_text()
    assert len(json.loads((tmp_path / "s.json").read_text())["scores"]) == 2
    lone = tmp_path / "lone.partial.jsonl"
    lone.write_text(json.dumps(rows[-1]) + "\n")
    with pytest.raises(SystemExit):
        main([str(lone), "--out", str(tmp_path / "t")])
