"""One setting read from this process's environment (what the app hands a replica through its
deployment's ``runtime_env``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def env_value(name: str, parse: Callable[[str], T], what: str) -> T | None:
    """``parse`` of ``name``'s value, None when it is unset or empty; a ValueError naming
    ``name`` and ``what`` it must be when ``parse`` rejects it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from exc
