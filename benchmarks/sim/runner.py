"""Run many (workload, policy, cluster size, seed) simulations, optionally in parallel.

``RunSpec`` names one run; ``run_specs`` executes a list with a tqdm bar and returns one
summary dict per spec (``RunSummary.to_dict()`` plus the spec's ``tag``). Workers build each
workload once per process (cached by name/seed/scale/overrides), so every policy of a matrix
sees the identical request list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm import tqdm

import benchmarks.sim.policies  # noqa: F401  (registers load_only)
from benchmarks.sim.calibration import DEFAULT_CALIBRATION, load_calibration
from benchmarks.sim.cluster import ClusterSim, SimConfig
from benchmarks.sim.results import RequestRecord
from benchmarks.workloads import Workload, build_workload
from cluster.selector.objective import ObjectiveConfig

DESIGN_REPLICAS = 8  # workloads are specified at 8 replicas; scale = num_replicas / 8


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One simulation. ``workload_overrides`` / ``objective`` / ``sim`` are JSON strings of
    keyword overrides (hashable, so workers can cache workloads)."""

    workload: str
    policy: str
    num_replicas: int
    seed: int = 0
    workload_overrides: str = "{}"
    objective: str = "{}"
    sim: str = "{}"
    calibration: str = str(DEFAULT_CALIBRATION)
    tag: str = ""
    records_dir: str = ""  # non-empty: write every request's record there (JSONL per run)


@dataclass(slots=True)
class MatrixResult:
    rows: list[dict[str, Any]] = field(default_factory=list)


def objective_config(overrides: dict[str, Any]) -> ObjectiveConfig:
    """ObjectiveConfig with ``overrides`` applied (``w`` given as a list becomes a tuple)."""
    kw = dict(overrides)
    if "w" in kw:
        kw["w"] = tuple(kw["w"])
    return ObjectiveConfig(**kw)


@lru_cache(maxsize=4)
def _workload(name: str, seed: int, scale: float, overrides: str) -> Workload:
    return build_workload(name, seed, scale, **json.loads(overrides))


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Execute one spec in this process."""
    workload = _workload(spec.workload, spec.seed, spec.num_replicas / DESIGN_REPLICAS,
                         spec.workload_overrides)
    sim_kw = json.loads(spec.sim)
    cfg = SimConfig(
        num_replicas=spec.num_replicas, policy=spec.policy,
        model=load_calibration(Path(spec.calibration)),
        objective=objective_config(json.loads(spec.objective)), seed=spec.seed, **sim_kw,
    )
    sim = ClusterSim(cfg, workload)
    row = sim.run().to_dict()
    if spec.records_dir:
        row["records_file"] = str(write_records(sim.records, spec, spec.records_dir))
    row["tag"] = spec.tag
    row["objective_overrides"] = json.loads(spec.objective)
    row["workload_overrides"] = json.loads(spec.workload_overrides)
    row["sim_overrides"] = sim_kw
    return row


def records_path(spec: RunSpec, directory: str | Path) -> Path:
    """``<dir>/<workload>__<policy>__<replicas>__s<seed>[__<scenario>].jsonl``."""
    wl = spec.workload.replace("/", "_").replace(":", "-")
    scenario = json.loads(spec.sim).get("scenario", "")
    extra = f"__{scenario}" if scenario else ""
    return Path(directory) / f"{wl}__{spec.policy}__{spec.num_replicas}__s{spec.seed}{extra}.jsonl"


def write_records(records: Sequence[RequestRecord], spec: RunSpec, directory: str | Path) -> Path:
    """One JSON object per completed request (``RequestRecord`` fields plus ``ttft_s``), in
    completion order; returns the file written."""
    path = records_path(spec, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({**asdict(r), "ttft_s": r.ttft_s}) + "\n")
    return path


def run_specs(
    specs: Sequence[RunSpec], jobs: int = 1, desc: str = "runs", partial: str | Path | None = None
) -> list[dict[str, Any]]:
    """Run every spec (``jobs`` worker processes; 1 = in process), in spec order. With
    ``partial`` every finished row is also appended to that JSONL file (crash-safe progress)."""
    sink = open(partial, "a") if partial else None  # noqa: SIM115 - closed below
    try:
        rows: list[dict[str, Any]] = []
        if jobs <= 1:
            results = (run_one(s) for s in specs)
            for row in tqdm(results, total=len(specs), desc=desc, unit="run"):
                rows.append(_sink(sink, row))
            return rows
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for row in tqdm(pool.map(run_one, specs), total=len(specs), desc=desc, unit="run"):
                rows.append(_sink(sink, row))
        return rows
    finally:
        if sink is not None:
            sink.close()


def _sink(sink: Any, row: dict[str, Any]) -> dict[str, Any]:
    if sink is not None:
        sink.write(json.dumps(row) + "\n")
        sink.flush()
    return row


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an earlier output: a routing/sweep JSON (``runs``) or a partial JSONL."""
    text = Path(path).read_text()
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(json.loads(text)["runs"])
