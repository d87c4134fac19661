"""Shared pytest configuration: the `gpu` marker skips without CUDA; the opt-in `faults`
marker (long fault runs on a real multi-node Ray cluster) runs only when ``-m`` names it."""

from __future__ import annotations

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "faults" not in (config.getoption("-m") or ""):
        skip_faults = pytest.mark.skip(reason="opt-in: pytest -m faults (minutes)")
        for item in items:
            if "faults" in item.keywords:
                item.add_marker(skip_faults)
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
