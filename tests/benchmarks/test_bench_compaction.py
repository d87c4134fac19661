"""The compaction benchmark runs the engine's trigger and plan on a small chat replay and
reports what it measured (compactions happen, contiguity does not get worse)."""

from __future__ import annotations

import argparse

from benchmarks.compaction_bench import run


def test_compaction_bench_reports_compactions_and_contiguity() -> None:
    args = argparse.Namespace(
        blocks=1024, requests=40, seeds=1, settings="1:1", bytes_per_block=64
    )
    off, on = run(args)
    assert off["compaction"] == "off" and off["num_compactions"] == 0
    assert on["num_compactions"] > 0 and on["blocks_moved_per_compaction"] > 0
    assert on["seqs_in_le2_runs"] >= off["seqs_in_le2_runs"]
    assert on["num_triggers"] >= on["num_compactions"]
    assert on["copy_ms"] > 0 and on["plan_ms"] > 0
