"""selector_select_profile: with ``--defer`` the answer ("total") and the route flushed after
it are timed apart, on a small index, with the marks in steady state (``--rate``)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.selector_select_profile import main


def test_defer_times_the_answer_and_the_flush_apart(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert main(["--replicas", "4", "--blocks-per-replica", "2000", "--num-requests", "30",
                 "--rate", "200", "--evict-mib", "1", "--defer", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["defer"] is True and res["meta"]["steady_selects"] == 600
    for mode in ("hot", "cold"):
        assert res[mode]["total"]["p50_us"] > 0
        assert res[mode]["flush after the answer"]["p50_us"] > 0
    assert "flush after the answer" in res["hot_steps"]
