"""Fixtures for the LangChain integration tests: a fresh engine per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lc_helpers import OLD, YOUNG

from klockwork import Klockwork


@pytest.fixture
def kw() -> Iterator[Klockwork]:
    engine = Klockwork()
    engine.register_agent(OLD, priority=0)
    engine.register_agent(YOUNG, priority=100)
    yield engine
    engine.close()
