"""Live streams over SSE: governance events and the audit tail, resumable, and who may follow."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from api_support import Keys, bearer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from klockwork import Klockwork
from klockwork.core.bus.model import EVENTS_CHANNEL
from klockwork.server import create_app
from klockwork.server.routes import streams
from klockwork.server.routes.streams import FOLLOWER_GROUP, Frame, Wakeup, sse

pytestmark = pytest.mark.timeout(30)

LEASE = ("FILE:/repo/a.txt", "MUTATES")


def _events(lines: Iterator[str], count: int, kinds: str = "") -> list[dict[str, Any]]:
    """The next ``count`` events of a stream (comments skipped) as {id, event, data}."""
    found: list[dict[str, Any]] = []
    event: dict[str, Any] = {}
    for line in lines:
        if line.startswith("id: "):
            event["id"] = int(line[4:])
        elif line.startswith("event: "):
            event["event"] = line[7:]
        elif line.startswith("data: "):
            event["data"] = json.loads(line[6:])
        elif line == "" and event:
            if not kinds or event["event"].startswith(kinds):
                found.append(event)
            event = {}
            if len(found) == count:
                return found
    raise AssertionError(f"the stream ended after {found}")


def _opened(lines: Iterator[str]) -> None:
    """Read the stream's first line: from now on it follows."""
    assert [next(lines), next(lines)] == ["retry: 3000", ""]


def test_governance_events_stream_as_they_happen_and_the_stream_ends_with_the_client(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    with client.stream("GET", "/v1/events/stream", headers=bearer(keys.approver)) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = answer.iter_lines()
        _opened(lines)
        assert kw.bus.listeners.active  # the stream follows klockwork.events
        verdict = kw.leases.acquire("indexer", "s1", LEASE, 30_000)
        kw.leases.release(verdict.leases[0].lease_id)
        granted, released = _events(lines, 2)
    assert granted["event"] == "lease.granted" and released["event"] == "lease.released"
    assert granted["data"]["agent_id"] == "indexer"
    assert granted["data"]["data"]["resource"] == "FILE:/repo/a.txt"
    assert released["id"] > granted["id"]
    assert not kw.bus.listeners.active  # the client left: the stream stopped following


@pytest.mark.parametrize("path", ["/v1/events/stream", "/v1/audit/stream"])
def test_a_stream_ends_once_its_key_is_revoked(
    app: FastAPI, kw: Klockwork, client: TestClient, keys: Keys, path: str
) -> None:
    record, secret = app.state.server.keys.create("mallory", "approver")
    with client.stream("GET", path, headers=bearer(secret)) as answer:
        lines = answer.iter_lines()
        _opened(lines)
        app.state.server.keys.revoke(record.key_id)
        kw.gates.execute("builder", "deploy.prod", {"secret": "v0"})  # not for mallory now
        ended = list(lines)  # the stream ends by itself (the test's timeout guards it)
    assert "event: signed_out" in ended
    assert not any("deploy.prod" in line for line in ended)


def test_the_events_stream_resumes_after_the_last_event_id_and_filters_kinds(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.bus.create_group(EVENTS_CHANNEL, "recorder")  # follows: the events are published
    kw.gates.execute("builder", "read.file", {})
    kw.gates.execute("builder", "deploy.prod", {"version": "2"})
    kw.gates.execute("builder", "db.drop", {})
    published = kw.bus.await_channels([EVENTS_CHANNEL], "at_least", n=4, after={}, wait_s=5)
    seqs = {m.payload["kind"]: m.seq for m in published.messages[EVENTS_CHANNEL]}
    assert set(seqs) >= {"action.executed", "action.requested", "approval.requested"}

    headers = {**bearer(keys.admin), "Last-Event-ID": str(seqs["action.executed"])}
    with client.stream("GET", "/v1/events/stream?after=0", headers=headers) as answer:
        lines = answer.iter_lines()
        _opened(lines)
        kinds = [e["event"] for e in _events(lines, 3)]
    assert kinds[0] != "action.executed" and "action.denied" in kinds

    with client.stream(
        "GET", "/v1/events/stream?after=0&kind=action.*", headers=bearer(keys.admin)
    ) as answer:
        lines = answer.iter_lines()
        _opened(lines)
        events = _events(lines, 3)
    assert [e["event"] for e in events] == ["action.executed", "action.requested", "action.denied"]
    assert events[1]["data"]["data"]["metadata"] == {"version": "2"}


def test_the_audit_stream_sends_new_entries_and_resumes(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.gates.execute("builder", "read.file", {"path": "/before"})
    with client.stream("GET", "/v1/audit/stream", headers=bearer(keys.approver)) as answer:
        lines = answer.iter_lines()
        _opened(lines)
        kw.gates.execute("builder", "read.file", {"path": "/after"})
        [entry] = _events(lines, 1, kinds="action.")
    assert entry["data"]["data"]["metadata"] == {"path": "/after"}  # only what came after
    assert entry["id"] == entry["data"]["seq"] and entry["data"]["hash"]

    headers = {**bearer(keys.approver), "Last-Event-ID": str(entry["id"] - 1)}
    with client.stream("GET", "/v1/audit/stream?kind=action.executed", headers=headers) as answer:
        lines = answer.iter_lines()
        _opened(lines)
        [again] = _events(lines, 1)
    assert again == entry


def test_the_audit_stream_finds_what_is_recorded_without_an_event(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    with client.stream("GET", "/v1/audit/stream", headers=bearer(keys.approver)) as answer:
        lines = answer.iter_lines()
        _opened(lines)
        client.get("/v1/audit", headers=bearer(keys.agent))  # refused: recorded, no event
        [denied] = _events(lines, 1)
    assert denied["event"] == "access.denied" and denied["data"]["data"]["path"] == "/v1/audit"


def test_a_quiet_stream_sends_keepalives(
    client: TestClient, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "HEARTBEAT_S", 0.05)
    with client.stream("GET", "/v1/events/stream", headers=bearer(keys.approver)) as answer:
        lines = answer.iter_lines()
        _opened(lines)
        assert next(lines) == ": keepalive"


@pytest.mark.parametrize("path", ["/v1/events/stream", "/v1/audit/stream"])
def test_only_approvers_and_admins_follow_the_streams(
    kw: Klockwork, client: TestClient, keys: Keys, path: str
) -> None:
    refused = client.get(path, headers=bearer(keys.agent))
    assert refused.status_code == 403
    assert kw.audit.query(kind="access.denied").entries[-1].data["path"] == path
    assert client.get(path).status_code == 401


@pytest.mark.parametrize(
    ("path", "headers", "argument"),
    [
        ("/v1/events/stream?after=-1", {}, "after"),
        ("/v1/audit/stream", {"Last-Event-ID": "seven"}, "last-event-id"),
        ("/v1/audit/stream?kind=lease.stolen", {}, "kind"),
        ("/v1/events/stream?kind=", {}, "kind"),
    ],
)
def test_bad_stream_arguments_are_422(
    client: TestClient, keys: Keys, path: str, headers: dict[str, str], argument: str
) -> None:
    answer = client.get(path, headers={**bearer(keys.admin), **headers})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["argument"].split(".")[-1] == argument  # header.last-event-id


def test_events_of_another_process_on_a_shared_store_reach_the_stream(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'kw.db'}"
    with Klockwork.open(url) as server_kw:
        app = create_app(server_kw)
        _, secret = app.state.server.keys.create("ops", "approver")
        with (
            TestClient(app) as client,
            client.stream("GET", "/v1/events/stream", headers=bearer(secret)) as answer,
        ):
            lines = answer.iter_lines()
            _opened(lines)
            assert [g.group for g in server_kw.bus.groups(EVENTS_CHANNEL)] == [FOLLOWER_GROUP]
            # An agent process opening the store now sees the group: it publishes its events.
            with Klockwork.open(url) as agent_kw:
                agent_kw.leases.acquire("far-agent", "s9", LEASE, 30_000)
                [granted] = _events(lines, 1)
    assert granted["event"] == "lease.granted" and granted["data"]["agent_id"] == "far-agent"


async def test_the_loop_reads_in_pages_waits_for_a_wakeup_and_ends_when_cancelled() -> None:
    backlog = [Frame(seq, "tick", "{}") for seq in range(1, 6)]
    asked: list[int] = []

    async def read(after: int) -> tuple[int, list[Frame]]:
        asked.append(after)
        page = [f for f in backlog if f.id > after][:2]
        return (page[-1].id if page else after), page

    async def alive() -> bool:
        return True

    wake = Wakeup()
    stream = sse(read, 0, wake, alive)
    assert await stream.__anext__() == b"retry: 3000\n\n"
    seen = [await stream.__anext__() for _ in range(3)]
    assert b"".join(seen).count(b"event: tick") == 5 and asked == [0, 2, 4]
    waiting = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # nothing new: it waits
    backlog.append(Frame(6, "tock", '{"n":6}'))
    wake()
    assert await asyncio.wait_for(waiting, 1) == b'id: 6\nevent: tock\ndata: {"n":6}\n\n'
    waiting = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


def test_a_real_server_stops_streaming_when_the_client_hangs_up(
    kw: Klockwork, app: FastAPI, keys: Keys
) -> None:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1/events/stream"
        with httpx.stream("GET", url, headers=bearer(keys.approver), timeout=10) as answer:
            lines = answer.iter_lines()
            _opened(lines)
            kw.leases.acquire("indexer", "s1", LEASE, 30_000)
            assert _events(lines, 1)[0]["event"] == "lease.granted"
            assert kw.bus.listeners.active
        deadline = time.monotonic() + 5
        while kw.bus.listeners.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not kw.bus.listeners.active  # the server noticed and the stream ended
    finally:
        server.should_exit = True
        thread.join(10)
