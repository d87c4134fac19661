"""``ray up cluster/local.yaml`` for real, over ssh on loopback: up, deploy, request, down.

Opt-in (``TINYSERVE_RAY_UP_TEST=1``; needs root, openssh-server and rsync): it starts a
private sshd on 127.0.0.1:22 that accepts only a throwaway key (its own AuthorizedKeysFile),
and runs the cluster launcher as a user would. The config is cluster/local.yaml with test-only
changes, each for the shared machine this runs on:

- ssh_user/ssh_private_key: root with the throwaway key;
- setup_commands link the already-built venv instead of ``make setup`` (minutes of installs);
- Ray, Serve and the dashboard get free ports and a private temp dir (other Ray clusters may
  be running here), and the start commands drop ``ray stop``.

NOTE: ``ray down`` runs a bare ``ray stop`` on the head, which would stop EVERY Ray process of
the host. The test first checks that ``ray`` is not on the login PATH (so that command fails
harmlessly), then stops its own head by the processes of its private temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
USER = "root"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TINYSERVE_RAY_UP_TEST") != "1",
                       reason="opt-in: TINYSERVE_RAY_UP_TEST=1 (root, sshd, rsync; minutes)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    print(f"$ {' '.join(cmd)}  -> {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A key-only sshd on 127.0.0.1:22 for USER; yields the private key path."""
    assert os.geteuid() == 0, "needs root (binds port 22)"
    for tool in ("/usr/sbin/sshd", "rsync", "ssh-keygen"):
        assert shutil.which(tool), f"{tool} missing: apt-get install openssh-server rsync"
    login_ray = subprocess.run(["bash", "--login", "-c", "command -v ray"],
                               capture_output=True, text=True, env={"HOME": "/root"})
    assert login_ray.returncode != 0, "`ray` on the login PATH: `ray down` would stop all Ray"
    tmp = tmp_path_factory.mktemp("sshd")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host")],
                   check=True)
    (tmp / "authorized_keys").write_text((tmp / "id_ed25519.pub").read_text())
    cfg = tmp / "sshd_config"
    cfg.write_text(f"ListenAddress 127.0.0.1\nPort 22\nHostKey {tmp / 'host'}\n"
                   f"PidFile {tmp / 'sshd.pid'}\nPasswordAuthentication no\n"
                   "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\n"
                   f"AllowUsers {USER}\nPermitRootLogin prohibit-password\nStrictModes no\n"
                   f"AuthorizedKeysFile {tmp / 'authorized_keys'}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)])
    try:
        time.sleep(1)
        assert proc.poll() is None, "sshd did not start"
        yield key
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _temp_dir(ports: dict[str, int]) -> str:
    return f"/tmp/tsup{ports['gcs']}"


def _cluster_yaml(tmp: Path, key: Path, ports: dict[str, int]) -> Path:
    config = yaml.safe_load((ROOT / "cluster/local.yaml").read_text())
    config["cluster_name"] = f"tinyserve-loopback-{ports['gcs']}"
    config["auth"] = {"ssh_user": USER, "ssh_private_key": str(key)}
    config["file_mounts"] = {"~/tinyserve": str(ROOT)}
    venv = ROOT / ".venv"
    config["setup_commands"] = [f"ln -sfn {venv} ~/tinyserve/.venv"]
    app = yaml.safe_load((ROOT / "deploy/app.yaml").read_text())
    app["http_options"] = {"host": "127.0.0.1", "port": ports["http"]}
    app["applications"][0]["args"]["selector"]["port"] = 0
    (tmp / "app.yaml").write_text(yaml.safe_dump(app))
    ray_bin = "~/tinyserve/.venv/bin"
    temp_dir = _temp_dir(ports)  # NOTE: short: Ray's unix socket paths must fit 107 bytes
    config["head_start_ray_commands"] = [
        f"ulimit -n 65536; {ray_bin}/ray start --head --port={ports['gcs']} "
        f"--dashboard-port={ports['dashboard']} --metrics-export-port={ports['metrics']} "
        f"--temp-dir={temp_dir} --num-cpus=4 --autoscaling-config=~/ray_bootstrap_config.yaml",
        "cd ~/tinyserve && RAY_AUTH_MODE=$(test -f ~/.ray/auth_token && echo token || echo "
        f"disabled) {ray_bin}/serve deploy --address http://127.0.0.1:"
        f"{ports['dashboard']} {tmp / 'app.yaml'}",
    ]
    path = tmp / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ray_up_serve_deploy_request_ray_down(sshd: Path, tmp_path: Path) -> None:
    ports = {name: _free_port() for name in ("gcs", "dashboard", "metrics", "http")}
    config = _cluster_yaml(tmp_path, sshd, ports)
    ray_cli = str(ROOT / ".venv/bin/ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    try:
        up = _run([ray_cli, "up", "-y", "--no-config-cache", str(config)], timeout=900, env=env)
        assert up.returncode == 0
        base = f"http://127.0.0.1:{ports['http']}"
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/v1/models", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(3)
        body = {"model": "smollm2-135m-instruct", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hi."}]}
        r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        print(r.status_code, r.text)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        down = _run([ray_cli, "down", "-y", str(config)], timeout=300, env=env)
        _stop_own_head(Path(_temp_dir(ports)))
    assert down.returncode == 0


def _stop_own_head(temp_dir: Path) -> None:
    """Stop the Ray processes of this test's private temp dir (raylet first: it takes its
    workers down), by pid; nothing else."""
    for pattern in ("raylet", str(temp_dir)):
        found = subprocess.run(["pgrep", "-f", f"{pattern}.*{temp_dir}|{temp_dir}.*{pattern}"],
                               capture_output=True, text=True)
        pids = [int(p) for p in found.stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(3)
