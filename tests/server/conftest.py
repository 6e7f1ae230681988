"""Fixtures of the HTTP API tests: an engine, its app, and one key per role."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_support import CLI_VARIABLES, Done, Here, Keys, make_keys
from fastapi import FastAPI
from fastapi.testclient import TestClient

from klockwork import Klockwork
from klockwork.cli import main
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
    return make_keys(app.state.server.keys)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def here(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Here:
    """The CLI run in this process (faster than a subprocess; the same code and codes)."""

    def run(*args: str, **env: str) -> Done:
        for name in CLI_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return run
