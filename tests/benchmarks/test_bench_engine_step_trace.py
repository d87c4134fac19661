"""benchmarks/engine_step_trace.py --smoke: the per-step trace runs on CPU and reports every
mode x compaction x round with its decode steps timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_reports_every_round(tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_step_trace.py"), "--smoke",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["mode"], r["compaction"], r["round"]) for r in rows} == {
        (m, c, n) for m in ("sync", "async") for c in ("between_steps", "idle", "off") for n in (0, 1)
    }
    for r in rows:
        # 8 requests x 24 tokens: prefill in 1 step (+2 skipped), the rest decode
        assert r["steps"] >= 24 and r["decode_steps"] == r["steps"] - 3
        s = r["decode_step_ms"]
        assert 0 < s["p50"] <= s["max"] and 0 < s["mean"] <= s["max"]
        assert r["decode_tok_s"] > 0 and r["fraction_of_roofline"] is None
        assert r["compactions"] == 0 or r["compaction"] == "between_steps"
        assert len(r["slowest_steps"]) == min(5, r["decode_steps"])
        assert r["slowest_steps"][0]["ms"] == max(x["ms"] for x in r["slowest_steps"])
