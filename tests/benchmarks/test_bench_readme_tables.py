"""README tables are generated from JSON: sections replaced between markers, cells computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.readme_tables import (
    main,
    rates_fit,
    replace_section,
    reward_levers,
    reward_matrix,
    scenario_cells,
)


def _row(policy: str, p99: float, seed: int = 0, obj: dict[str, float] | None = None,
         scenario: str = "hetero", hit: float = 0.5) -> dict[str, object]:  # fmt: skip
    sim = {"scenario": scenario} if scenario else {}
    return {"workload": "w", "num_replicas": 32, "seed": seed, "policy": policy,
            "ttft_p99_s": p99, "hit_ratio": hit, "cluster_utilization": 0.5,
            "objective_overrides": obj or {}, "sim_overrides": sim}  # fmt: skip


def test_replace_section_keeps_the_rest() -> None:
    text = "a\n<!-- t:begin -->\nold\n<!-- t:end -->\nb\n"
    assert replace_section(text, "t", "new") == "a\n<!-- t:begin -->\nnew\n<!-- t:end -->\nb\n"
    with pytest.raises(ValueError, match="markers"):
        replace_section("no markers", "t", "x")


def test_scenario_cells_take_the_best_baseline_and_both_variants() -> None:
    rows = [_row("preble", 0.2), _row("preble", 0.4, seed=1), _row("llmd_weighted", 0.25),
            _row("llmd_weighted", 0.25, seed=1), _row("load_only", 0.01),
            _row("tinyserve", 0.15), _row("tinyserve", 0.17, seed=1),
            _row("tinyserve", 0.3, obj={"lambda_reward": 0.0})]  # fmt: skip
    (cell,) = scenario_cells(rows)
    assert cell["best_baseline"] == "llmd_weighted" and cell["best_baseline_ttft_p99_s"] == 0.25
    assert cell["R on"]["ttft_p99_s"] == pytest.approx(0.16)
    assert cell["R on"]["ratio"] == pytest.approx(0.64) and cell["R off"]["ratio"] == 1.2


def test_reward_matrix_and_the_cli_rewrite(tmp_path: Path) -> None:
    rows = [_row("tinyserve", 0.1, scenario=""),
            _row("tinyserve", 0.11, obj={"lambda_reward": 0.0}, scenario="")]  # fmt: skip
    table = reward_matrix({"runs": rows})
    assert "| w | 32 | 0 | 0.110 | 0.100 | 0.909 |" in table
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- reward-matrix:begin -->\n<!-- reward-matrix:end -->\n")
    assert main(["--reward-matrix", str(src), "--readme", str(readme), "--check"]) == 1
    assert main(["--reward-matrix", str(src), "--readme", str(readme)]) == 0
    assert "0.909" in readme.read_text()
    assert main(["--reward-matrix", str(src), "--readme", str(readme), "--check"]) == 0


def test_rates_fit_compares_the_default_tinyserve_rows_only(tmp_path: Path) -> None:
    def ts(p99: float, seed: int, hit: float = 0.5, obj: dict[str, float] | None = None,
           scenario: str = "") -> dict[str, object]:  # fmt: skip
        return _row("tinyserve", p99, seed=seed, obj=obj, scenario=scenario, hit=hit)

    configured = [ts(0.10, 0), ts(0.12, 1), ts(0.5, 0, obj={"lambda_reward": 0.0}),
                  _row("preble", 0.01, scenario="")]  # fmt: skip
    measured = [ts(0.09, 0, hit=0.6), ts(0.11, 1, hit=0.6), ts(0.3, 0, scenario="hetero"),
                ts(0.5, 2)]  # seed 2 has no configured row: left out  # fmt: skip
    before = [ts(0.13, 0), ts(0.15, 1)]
    table = rates_fit(configured, measured, before)
    assert "| w | 32 | 0,1 | 0.1100 | 0.1000 | 0.909 | 0.1400 | 1.273 | 0.500 | 0.600 | 0.500 |" in table
    assert "measured / configured over 1 cells: 0.909" in table
    assert "before / configured over 1 cells: 1.273" in table
    paths = []
    for name, rows in (("c", configured), ("m", measured)):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- rates-fit:begin -->\n<!-- rates-fit:end -->\n")
    assert main(["--rates", *map(str, paths), "--readme", str(readme)]) == 0
    assert "| 0.909 | 0.500 | 0.600 |" in readme.read_text()
    with pytest.raises(SystemExit, match="CONFIGURED"):
        main(["--rates", str(paths[0]), "--readme", str(readme)])


def test_reward_levers_one_column_per_objective_override() -> None:
    rows = [_row("preble", 0.2), _row("llmd_weighted", 0.25), _row("load_only", 0.01),
            _row("tinyserve", 0.18), _row("tinyserve", 0.22, obj={"lambda_reward": 0.0}),
            _row("tinyserve", 0.15, obj={"lambda_reward": 2.0}),
            _row("tinyserve", 0.5, scenario="")]  # no scenario: not a lever cell  # fmt: skip
    reported = _row("tinyserve", 0.12)
    reported["sim_overrides"] = {"scenario": "hetero", "scenario_reported": True}
    table = reward_levers([*rows, reported])
    head, _, row, *_ = table.splitlines()
    assert head.split(" | ")[4:] == ["R off", "defaults", "defaults, rates reported",
                                     "lambda_reward 2 |"]  # fmt: skip
    assert row == "| hetero | w | 32 | 0.200 | 1.10 | 0.90 | 0.60 | 0.75 |"
