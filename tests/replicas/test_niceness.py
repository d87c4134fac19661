"""replicas.niceness: every thread of the process moves, processes spawned afterwards inherit it,
and a lowering the OS refuses is reported, not raised (each case in a fresh interpreter, so the
test process keeps its own niceness)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from replicas.niceness import ENV, apply_niceness, target_from_env

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux threads")

RAISE = textwrap.dedent("""
    import multiprocessing, os, threading
    from replicas.niceness import apply_niceness

    def child_nice(q):
        q.put(os.getpriority(os.PRIO_PROCESS, 0))

    if __name__ == "__main__":
        stop = threading.Event()
        workers = [threading.Thread(target=stop.wait) for _ in range(3)]
        for w in workers:
            w.start()
        start = os.getpriority(os.PRIO_PROCESS, 0)
        result = apply_niceness()
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        nice = sorted({os.getpriority(os.PRIO_PROCESS, t) for t in tids})
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=child_nice, args=(q,))
        p.start()
        spawned = q.get(timeout=60)
        p.join()
        stop.set()
        print(start, result, len(tids), nice, spawned, sep="|")
""")


def _run(tmp_path: Path, env: dict[str, str], pre: int = 0) -> list[str]:
    # NOTE: a file, not -c: spawn re-imports the parent's __main__ to find child_nice
    script = tmp_path / "nice_main.py"
    script.write_text(RAISE)
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
             **env},
        capture_output=True,
        text=True, timeout=120, check=True,
        preexec_fn=(lambda: os.nice(pre)) if pre else None,
    )
    return out.stdout.strip().splitlines()[-1].split("|")


def test_every_thread_and_a_process_spawned_after_take_the_niceness(tmp_path: Path) -> None:
    start, result, n_threads, nice, spawned = _run(tmp_path, {ENV: "7"})
    assert start == "0" and result == "0 -> 7"
    assert int(n_threads) >= 4  # NOTE: the main thread and the three workers, all of them moved
    assert nice == "[7]" and spawned == "7"


def test_a_refused_lowering_is_reported_and_changes_nothing(tmp_path: Path) -> None:
    # NOTE: from 5 down to 2 needs root or CAP_SYS_NICE: the outcome depends on who runs the
    # test, so it is asked of the OS first, then checked against what apply_niceness did.
    probe = "import os; os.setpriority(os.PRIO_PROCESS, 0, 2); print('ok')"
    allowed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.nice(5),
    ).returncode == 0
    start, result, _, nice, spawned = _run(tmp_path, {ENV: "2"}, pre=5)
    assert start == "5"
    if allowed:
        assert result == "5 -> 2" and nice == "[2]" and spawned == "2"
    else:
        assert result.startswith("5 -> 2 not permitted") and "RAY_worker_niceness=2" in result
        assert nice == "[5]" and spawned == "5"


def test_unset_leaves_the_process_alone_and_bad_values_fail(monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert target_from_env() is None and apply_niceness() == "unchanged"
    monkeypatch.setenv(ENV, str(os.getpriority(os.PRIO_PROCESS, 0)))
    assert apply_niceness() == "unchanged"
    for bad in ("high", "25"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            target_from_env()


def test_the_replica_reads_its_cores_niceness_while_the_core_lives() -> None:
    from replicas.niceness import niceness_of

    child = subprocess.Popen([sys.executable, "-c", "import os, time; os.nice(2); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10.0
        while niceness_of(child.pid) != os.getpriority(os.PRIO_PROCESS, 0) + 2:
            assert time.monotonic() < deadline, "the child never reached its niceness"
            time.sleep(0.02)
    finally:
        child.kill()
        child.wait()
    assert niceness_of(child.pid) is None and niceness_of(None) is None
