"""The selection service's ``tinyserve_selector_*`` series inside the app, through Ray.

The core counts into its own ``prometheus_client`` registry (``cluster.selector.metrics``; what the
standalone CLI serves on ``--metrics-port``). A Serve deployment has no port of its own to
scrape, so ``MetricsMirror`` copies that registry into Ray's metrics API every
``interval_s``; Ray exports them on its metrics port as ``ray_tinyserve_selector_*``, beside
the replicas' and the router's series, with Serve's deployment/replica labels.

- counters: the increase since the last copy (``Counter.inc``);
- gauges: the value (a label set the core removed, e.g. a replica that left, is set to 0);
- histograms: per bucket, the new observations, re-observed at the bucket's upper bound, so
  bucket counts and ``_count`` are exact and ``_sum`` is an upper bound (NOTE: Ray's
  histogram takes single observations only).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from prometheus_client import CollectorRegistry

log = logging.getLogger("ray.serve")
Labels = tuple[tuple[str, str], ...]


class MetricsMirror:
    """Copies ``registry`` into ``ray.serve.metrics`` on a daemon thread (``start``/``stop``);
    ``copy_once`` does one pass (tests)."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = 2.0) -> None:
        self._registry = registry
        self._interval_s = interval_s
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[str, set[Labels]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-mirror", daemon=True)

    def start(self) -> MetricsMirror:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.copy_once()
            except Exception as exc:  # NOTE: metrics never take the service down
                log.info("selector metrics mirror failed: %r", exc)

    def _metric(self, kind: str, name: str, doc: str, tag_keys: tuple[str, ...],
                boundaries: list[float] | None = None) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            from ray.serve import metrics

            keys: Any = tag_keys  # NOTE: Ray annotates it as a 1-tuple; any tuple works

            if kind == "counter":
                metric = metrics.Counter(name, description=doc, tag_keys=keys)
            elif kind == "gauge":
                metric = metrics.Gauge(name, description=doc, tag_keys=keys)
            else:
                metric = metrics.Histogram(
                    name, description=doc, boundaries=boundaries or [], tag_keys=keys
                )
            self._metrics[name] = metric
        return metric

    def _delta(self, name: str, labels: Labels, value: float) -> float:
        key = (name, labels)
        delta = value - self._last.get(key, 0.0)
        self._last[key] = value
        return delta

    def copy_once(self) -> None:
        for family in self._registry.collect():
            if family.type == "counter":
                self._counter(family)
            elif family.type == "gauge":
                self._gauge(family)
            elif family.type == "histogram":
                self._histogram(family)

    def _counter(self, family: Any) -> None:
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue  # NOTE: ``_created`` timestamps
            labels = tuple(sorted(s.labels.items()))
            metric = self._metric("counter", family.name, family.documentation,
                                  tuple(k for k, _ in labels))
            delta = self._delta(s.name, labels, s.value)
            if delta > 0:
                metric.inc(delta, tags=dict(labels) or None)

    def _gauge(self, family: Any) -> None:
        seen: set[Labels] = set()
        tag_keys: tuple[str, ...] = ()
        for s in family.samples:
            labels = tuple(sorted(s.labels.items()))
            tag_keys = tuple(k for k, _ in labels)
            seen.add(labels)
            metric = self._metric("gauge", family.name, family.documentation, tag_keys)
            metric.set(s.value, tags=dict(labels) or None)
        gone = self._gauges.get(family.name, set()) - seen
        if gone:
            metric = self._metric("gauge", family.name, family.documentation,
                                  tuple(k for k, _ in next(iter(gone))))
            for labels in gone:
                metric.set(0.0, tags=dict(labels) or None)
        self._gauges[family.name] = seen

    def _histogram(self, family: Any) -> None:
        series: dict[Labels, list[tuple[float, float]]] = {}
        for s in family.samples:
            if s.name.endswith("_bucket"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                series.setdefault(labels, []).append((float(s.labels["le"]), s.value))
        for labels, buckets in series.items():
            buckets.sort()
            bounds = [le for le, _ in buckets if math.isfinite(le)]
            metric = self._metric("histogram", family.name, family.documentation,
                                  tuple(k for k, _ in labels), bounds)
            below = 0.0
            for le, cumulative in buckets:
                count = cumulative - below  # this bucket alone
                below = cumulative
                new = int(self._delta(f"{family.name}:{le}", labels, count))
                value = le if math.isfinite(le) else 2 * (bounds[-1] if bounds else 1.0)
                for _ in range(max(new, 0)):
                    metric.observe(value, tags=dict(labels) or None)
