"""selector_scaling's CPU plan for ``--pin``: servers on their own CPUs, clients on the rest."""

from __future__ import annotations

import pytest

from benchmarks.selector_scaling import pin_plan


def test_each_server_gets_its_own_cpu_and_the_clients_the_rest() -> None:
    servers, clients = pin_plan(4, 16)
    assert servers == [{0}, {1}, {2}, {3}]
    assert clients == set(range(4, 16))
    assert not clients & set().union(*servers)


def test_no_cpu_left_for_the_clients_is_an_error() -> None:
    with pytest.raises(ValueError, match="more CPUs"):
        pin_plan(2, 2)
