"""Fixtures for the selection-service tests."""

from __future__ import annotations

import pytest
from selector_helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
