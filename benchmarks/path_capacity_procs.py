"""serve_path_capacity's process accounting: which process of a local Ray + Serve cluster plays
which role, and the CPU seconds each role spends between two snapshots.

Roles (by the process title Ray sets, ``ray::<actor>``; a process's children count with it,
except a replica's, which is its engine core)::

    proxy      ray::ProxyActor
    haproxy    the HAProxy process of Serve's HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1``)
    ingress    ray::ServeReplica:<app>:OpenAIIngress (every ingress replica)
    replica    ray::ServeReplica:<app>:LLMReplica (the serving side: handle calls, outputs)
    engine     the replica's engine-core process (``EngineConfig.engine_process``), a child
    selector   ray::ServeReplica:<app>:CacheSelector
    controller ray::ServeController
    ray        raylet, gcs_server, Ray's agents and idle workers
    client     the load generator (its own process)
    driver     the benchmark's own process (the Ray driver; idle during a run)

Pure functions over ``psutil`` snapshots (``classify`` is tested without Ray).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil

ROLES = ("proxy", "haproxy", "ingress", "replica", "engine", "selector", "controller", "ray", "client", "driver")


def classify(cmdline: str, app: str) -> str:
    """The role of a process from its command line (``ROLES``; "ray" when nothing matches)."""
    if cmdline.startswith("ray::ProxyActor"):
        return "proxy"
    if cmdline.split(" ", 1)[0].endswith("haproxy"):
        return "haproxy"
    if cmdline.startswith("ray::ServeController"):
        return "controller"
    for role, deployment in (("ingress", "OpenAIIngress"), ("replica", "LLMReplica"),
                             ("selector", "CacheSelector")):
        if cmdline.startswith(f"ray::ServeReplica:{app}:{deployment}"):
            return role
    return "ray"


@dataclass(slots=True)
class CpuSnapshot:
    """CPU seconds (user + system) per pid, and each pid's role."""

    seconds: dict[int, float]
    roles: dict[int, str]


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _spawned(proc: psutil.Process) -> bool:
    """A child the driver started with ``multiprocessing`` (a client process of its pool)."""
    try:
        return "multiprocessing" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def snapshot(driver_pid: int, client_pid: int | None, app: str) -> CpuSnapshot:
    """Every descendant of the driver (Ray's processes), the driver and the client.

    NOTE: a child inherits its parent's role unless its own title names one; a replica's
    child is its engine core (titled by Python's multiprocessing, not by Ray); the driver's own
    ``multiprocessing`` children are clients (serve_overhead's client processes)."""
    seconds: dict[int, float] = {}
    roles: dict[int, str] = {}
    driver = psutil.Process(driver_pid)

    def visit(proc: psutil.Process, inherited: str) -> None:
        try:
            role = classify(" ".join(proc.cmdline()), app)
            if role == "ray" and inherited == "replica":
                role = "engine"
            elif role == "ray" and inherited not in ("ray", "driver"):
                role = inherited
            seconds[proc.pid] = _cpu(proc)
            roles[proc.pid] = role
            children = proc.children()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return
        for child in children:
            if child.pid != client_pid:
                visit(child, role)

    seconds[driver_pid] = _cpu(driver)
    roles[driver_pid] = "driver"
    for child in driver.children():
        if child.pid != client_pid:
            visit(child, "client" if _spawned(child) else "ray")
    if client_pid is not None:
        try:
            client = psutil.Process(client_pid)
            seconds[client_pid] = _cpu(client)
            roles[client_pid] = "client"
        except psutil.NoSuchProcess:
            pass
    return CpuSnapshot(seconds, roles)


def cpu_by_role(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds spent per role between the snapshots (a pid new in ``after`` counts from 0;
    one gone by ``after`` is lost, so snapshot before a process exits)."""
    out = dict.fromkeys(ROLES, 0.0)
    for pid, sec in after.seconds.items():
        role = after.roles[pid]
        out[role] += max(sec - before.seconds.get(pid, 0.0), 0.0)
    return out


def pids_of(snap: CpuSnapshot, role: str) -> list[int]:
    return sorted(pid for pid, r in snap.roles.items() if r == role)


def host_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host since boot, every core (idle and iowait are
    not busy)."""
    t = psutil.cpu_times()
    total = float(sum(t))
    return total - float(t.idle) - float(getattr(t, "iowait", 0.0)), total


def cpu_report(before: CpuSnapshot, after: CpuSnapshot, host_before: tuple[float, float],
               host_after: tuple[float, float], wall_s: float, num_requests: int,
               ) -> dict[str, Any]:
    """Where a run's CPU went: ``ms_per_req`` by role (plus ``rest``: the host's busy time
    outside the snapshots' processes), ``busiest`` by role (the role's busiest
    process in cores: ~1.0 is a process bound to one core, its GIL), and the host's ``busy``
    fraction of ``cores`` over the run.

    NOTE: the host's figures cover its whole CPU, so other work on the host lands in ``rest``."""
    by_role = cpu_by_role(before, after)
    busy = host_after[0] - host_before[0]
    cores = psutil.cpu_count() or 1
    busiest: dict[str, float] = {}
    for pid, sec in after.seconds.items():
        role = after.roles[pid]
        used = max(sec - before.seconds.get(pid, 0.0), 0.0) / wall_s
        busiest[role] = max(busiest.get(role, 0.0), used)
    n = max(num_requests, 1)
    ms = {r: round(1e3 * s / n, 2) for r, s in by_role.items() if s > 0}
    ms["rest"] = round(1e3 * max(busy - sum(by_role.values()), 0.0) / n, 2)
    return {"ms_per_req": ms,
            "busiest": {r: round(v, 2) for r, v in busiest.items() if v > 0},
            "busy": round(busy / max(host_after[1] - host_before[1], 1e-9), 3),
            "cores": cores}
