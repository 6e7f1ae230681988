"""Health: it tells a store that answers reads but takes no write (a full disk) from a sound one."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from klockwork import Klockwork, StoreUnavailableError
from klockwork.server.routes.system import WriteProbe


def test_health_says_when_the_store_cannot_write(
    kw: Klockwork, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(WriteProbe, "EVERY_S", 0.0)  # probe on every ask, for the test
    assert client.get("/v1/health").json()["status"] == "ok"
    write = kw.store.update_record

    def full_disk(kind: str, *args: Any) -> Any:
        if kind == "health":
            raise StoreUnavailableError("database or disk is full")
        return write(kind, *args)

    monkeypatch.setattr(kw.store, "update_record", full_disk)
    answer = client.get("/v1/health")
    assert answer.status_code == 503
    assert answer.json()["error"] == {
        "type": "store_unavailable",
        "message": "the store answers but cannot write",
        "argument": None,
    }
    monkeypatch.setattr(kw.store, "update_record", write)
    assert client.get("/v1/health").status_code == 200


def test_health_writes_at_most_every_few_seconds(
    kw: Klockwork, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    write = kw.store.update_record

    def counted(kind: str, *args: Any) -> Any:
        writes.append(kind)
        return write(kind, *args)

    monkeypatch.setattr(kw.store, "update_record", counted)
    for _ in range(20):  # anyone may ask (no key): it must not be a way to make writes
        assert client.get("/v1/health").status_code == 200
    assert writes.count("health") == 1
