"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from klockwork import Klockwork


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """Each store a test runs against, by name."""
    return str(request.param)


@pytest.fixture
def any_kw(store_kind: str, tmp_path: Path) -> Iterator[Klockwork]:
    """A fresh engine on each store (memory, then a SQLite file of its own)."""
    url = "memory://" if store_kind == "memory" else f"sqlite:///{tmp_path / 'kw.db'}"
    engine = Klockwork.open(url)
    yield engine
    engine.close()
