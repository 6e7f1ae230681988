"""Fixtures of the HTTP API tests: an engine, its app, and one key per role."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_support import Keys
from fastapi import FastAPI
from fastapi.testclient import TestClient

from klockwork import Klockwork
from klockwork.server import create_app


@pytest.fixture
def kw() -> Iterator[Klockwork]:
    engine = Klockwork()
    engine.policies.add({"name": "deploys", "action": "deploy.*", "effect": "require_approval"})
    engine.policies.add({"name": "reads", "action": "read.*", "effect": "allow"})
    engine.policies.add({"name": "no-drops", "action": "db.drop", "effect": "deny"})
    yield engine
    engine.close()


@pytest.fixture
def app(kw: Klockwork) -> FastAPI:
    return create_app(kw)


@pytest.fixture
def keys(app: FastAPI) -> Keys:
    made = app.state.server.keys
    return Keys(
        admin=made.create("root", "admin")[1],
        approver=made.create("bob", "approver")[1],
        other_approver=made.create("carol", "approver")[1],
        agent=made.create("builder", "agent", owner="alice")[1],
        other_agent=made.create("reviewer", "agent")[1],
        alice=made.create("alice", "approver")[1],
    )


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c
