"""MetricsMirror's arithmetic (counter deltas, gauges incl. removed label sets, histogram
buckets) against recording stand-ins for Ray's metric classes: they only work inside a Serve
replica; the real export is checked on a scrape in tests/cluster/test_app_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("ray.serve")

from cluster.selector.metrics import SelectorMetrics
from cluster.serve.metrics_mirror import MetricsMirror


class _Recorder:
    def __init__(self, name: str, description: str = "", tag_keys: Any = None,
                 boundaries: Any = None) -> None:
        self.name, self.description, self.tag_keys = name, description, tag_keys
        self.boundaries = boundaries
        self.calls: list[tuple[str, float, dict[str, str] | None]] = []
        CREATED[name] = self

    def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("observe", value, tags))


CREATED: dict[str, _Recorder] = {}


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> tuple[SelectorMetrics, MetricsMirror]:
    from ray.serve import metrics

    CREATED.clear()
    for cls in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(metrics, cls, _Recorder)
    m = SelectorMetrics()
    return m, MetricsMirror(m.registry)


def test_counters_copy_their_increase_once(mirror: tuple[SelectorMetrics, MetricsMirror]) -> None:
    m, mir = mirror
    m.decisions.labels("tinyserve").inc(3)
    m.resyncs.inc()
    mir.copy_once()
    m.decisions.labels("tinyserve").inc(2)
    mir.copy_once()
    mir.copy_once()  # nothing new
    dec = CREATED["tinyserve_selector_decisions"]
    assert dec.calls == [("inc", 3.0, {"policy": "tinyserve"}), ("inc", 2.0, {"policy": "tinyserve"})]
    assert dec.tag_keys == ("policy",) and "policy" in dec.description.lower()
    assert CREATED["tinyserve_selector_resyncs"].calls == [("inc", 1.0, None)]


def test_gauges_copy_values_and_zero_a_removed_label_set(
    mirror: tuple[SelectorMetrics, MetricsMirror],
) -> None:
    m, mir = mirror
    m.index_blocks.labels("r1").set(7)
    m.index_blocks.labels("r2").set(9)
    mir.copy_once()
    m.index_blocks.remove("r1")
    mir.copy_once()
    calls = CREATED["tinyserve_selector_index_blocks"].calls
    assert ("set", 7.0, {"replica_id": "r1"}) in calls[:2]
    assert calls[-1] == ("set", 0.0, {"replica_id": "r1"})
    assert ("set", 9.0, {"replica_id": "r2"}) in calls[2:]


def test_histogram_buckets_are_exact(mirror: tuple[SelectorMetrics, MetricsMirror]) -> None:
    m, mir = mirror
    for v in (2e-5, 2e-5, 3e-4, 5.0):
        m.select_latency.labels("tinyserve").observe(v)
    mir.copy_once()
    m.select_latency.labels("tinyserve").observe(2e-5)
    mir.copy_once()
    h = CREATED["tinyserve_selector_select_latency_seconds"]
    values = sorted(v for kind, v, _ in h.calls if kind == "observe")
    assert values == [2.5e-5] * 3 + [5e-4, 0.2]  # bucket upper bounds; +Inf at 2x the last
    assert h.boundaries[:2] == [1e-5, 2.5e-5]
