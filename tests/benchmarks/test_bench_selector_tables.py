"""The selector's README tables come from the committed JSON (and the README is current)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.selector_tables import ab_table, main, rpc_table

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_ab_table_cells_are_the_medians_with_their_runs() -> None:
    fig = {"compute_p99_us": {"runs": [120.0, 90.0, 100.0], "median": 100.0}}
    table = ab_table({"figures": fig}, {"figures": {}})
    row = next(line for line in table.splitlines() if "p99, hot loop" in line)
    assert row == "| core.select thread CPU p99, hot loop (us) | 100 (120, 90, 100) | - | 100 |"


def test_rpc_table_has_a_row_per_front_end() -> None:
    p = {"p50_us": 500.0, "p99_us": 900.0}
    r = {"ping": p, "select": p, "select_over_ping_p50": 1.0, "ping_rps": 4000.0,
         "select_rps": 2000.0, "ping_server_cpu_us": 200.0, "select_server_cpu_us": 450.0}  # fmt: skip
    table = rpc_table({"results": {"aio-wire": r, "sync-wire": r}})
    assert table.splitlines()[2].startswith("| aio-wire | 500 | 500 / 900 | 1.00 | 4,000 |")
    assert len(table.splitlines()) == 4


def test_the_readme_tables_match_the_committed_results(tmp_path: Path) -> None:
    readme = Path(__file__).resolve().parents[2] / "benchmarks" / "README.md"
    args = ["--ab", str(RESULTS / "selector_cpu_base_median.json"),
            str(RESULTS / "selector_cpu_median.json"),
            "--rpc", str(RESULTS / "selector_rpc_cpu.json"), "--readme", str(readme)]  # fmt: skip
    assert main([*args, "--check"]) == 0
    assert json.loads((RESULTS / "selector_rpc_cpu.json").read_text())["results"]
