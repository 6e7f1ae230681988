"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Each store a test runs against, by name."""
    return str(request.param)
