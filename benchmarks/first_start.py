"""First-start time of ``make run``: from the command to the first chat completion.

Runs ``make run`` in a checkout (its ``scripts/run_local.sh`` declares ready only once a
chat completion succeeded and prints ``== ready``), timestamps that line, then sends Ctrl-C
(SIGINT to make's process group) and waits for the app and its Ray head to stop.

    cold: a checkout whose venv does not exist yet (``make run`` sets it up) and an empty
          model cache (the GGUF is converted on this start)
    warm: the same checkout again (venv and converted model in place)

    python benchmarks/first_start.py --checkout /tmp/clone --json benchmarks/results/first_start.json

It uses the ports ``make run`` uses (8000, 6379, 8265, 8080): run it where no other Ray
cluster or app holds them. The API key comes from ``$TINYSERVE_API_KEYS`` (made here), so
nothing is written under ``~/.config``. Figures are wall-clock seconds on this machine
(noisy, shared): a measurement of this box, not of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def one_start(checkout: Path, cache_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Time ``make run`` to its ``== ready`` line; then stop it. Returns the figures."""
    env = {**os.environ, "TINYSERVE_CACHE_DIR": str(cache_dir),
           "TINYSERVE_API_KEYS": "sk-first-start-" + secrets.token_hex(12)}
    venv_existed = (checkout / ".venv" / ".installed").exists()
    model_cached = any(cache_dir.glob("**/*.safetensors"))
    start = time.monotonic()
    proc = subprocess.Popen(["make", "-s", "run"], cwd=checkout, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    marks: dict[str, float] = {}
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            now = time.monotonic() - start
            if line.startswith("== setup: done"):
                marks["setup_done_s"] = now
            elif line.startswith("== serve run"):
                marks["serve_run_s"] = now
            elif line.startswith("== ready"):
                marks["ready_s"] = now
                break
            if now > timeout_s:
                break
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # NOTE: what Ctrl-C in the terminal sends
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    return {"venv_existed": venv_existed, "model_cached": model_cached, **marks,
            "stopped_s": round(time.monotonic() - start, 1), "output_tail": lines[-8:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, required=True,
                   help="a clone whose .venv does not exist yet (the cold start makes it)")
    p.add_argument("--timeout-s", type=float, default=1500.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinyserve-cache-") as cache:
        runs = {name: one_start(args.checkout, Path(cache), args.timeout_s)
                for name in ("cold", "warm")}
    print("| start | venv existed | model cached | setup done s | ready s |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in runs.items():
        print(f"| {name} | {r['venv_existed']} | {r['model_cached']} | "
              f"{r.get('setup_done_s', '-')} | {r.get('ready_s', 'NOT READY')} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
