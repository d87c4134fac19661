"""benchmarks/selector_fixture.recv_from: a dead server process is an error, not a hang."""

from __future__ import annotations

import multiprocessing as mp
import sys

import pytest

from benchmarks.selector_fixture import recv_from


def test_a_server_that_died_is_reported_with_its_exit_code() -> None:
    ctx = mp.get_context("spawn")
    parent, _child = ctx.Pipe()
    proc = ctx.Process(target=sys.exit, args=(3,))
    proc.start()
    with pytest.raises(RuntimeError, match=r"exited \(code 3\)"):
        recv_from(parent, proc)
    proc.join()
