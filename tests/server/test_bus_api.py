"""The bus over HTTP: publish, long-poll subscribe, ack/nack, peek, and who may do what."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from api_support import HangingUpClient, Keys, bearer
from fastapi import FastAPI
from fastapi.testclient import TestClient

from klockwork import Klockwork
from klockwork.core.bus.model import EVENTS_CHANNEL


def _read(client: TestClient, key: str, consumer: str = "w1", **body: object) -> httpx.Response:
    return client.post(
        "/v1/bus/jobs/subscribe",
        headers=bearer(key),
        json={"group": "workers", "consumer": consumer, **body},
    )


def test_publish_subscribe_ack_round_trip(kw: Klockwork, client: TestClient, keys: Keys) -> None:
    kw.bus.create_group("jobs", "workers")
    sent = client.post(
        "/v1/bus/jobs/publish", headers=bearer(keys.agent), json={"payload": {"job": 1}}
    )
    assert sent.status_code == 200, sent.text
    message = sent.json()
    assert message["channel"] == "jobs" and message["seq"] == 1
    assert message["payload"] == {"job": 1}

    taken = _read(client, keys.agent, max_messages=5)
    assert taken.status_code == 200, taken.text
    [delivery] = taken.json()
    assert delivery["message"]["id"] == message["id"] and delivery["attempt"] == 1
    assert delivery["consumer"] == "builder:w1"  # an agent's consumer carries its name
    assert delivery["group"] == "workers"

    acked = client.post(
        "/v1/bus/jobs/ack",
        headers=bearer(keys.agent),
        json={"group": "workers", "message_ids": [message["id"]]},
    )
    assert acked.status_code == 200 and acked.json() == {"acked": 1}
    assert kw.bus.groups("jobs")[0].pending == 0
    assert _read(client, keys.agent).json() == []


def test_a_publish_key_is_idempotent_and_deliver_at_hides_the_message(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    body = {"payload": {"order": 5}, "key": "order-5"}
    first = client.post("/v1/bus/orders/publish", headers=bearer(keys.admin), json=body).json()
    again = client.post("/v1/bus/orders/publish", headers=bearer(keys.admin), json=body).json()
    assert first == again
    later = kw.clock.now_ms() + 60_000
    hidden = client.post(
        "/v1/bus/orders/publish",
        headers=bearer(keys.agent),
        json={"payload": {"order": 6}, "deliver_at": later},
    ).json()
    assert hidden["visible_at"] == later
    peeked = client.get("/v1/bus/orders/peek", headers=bearer(keys.approver)).json()
    assert [m["payload"]["order"] for m in peeked] == [5]


def test_subscribe_long_polls_until_a_publish(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.bus.create_group("jobs", "workers")
    timer = threading.Timer(0.2, kw.bus.publish, ["jobs", {"job": "late"}])
    started = time.monotonic()
    timer.start()
    try:
        taken = _read(client, keys.agent, wait_s=10)
    finally:
        timer.cancel()
    assert taken.status_code == 200
    assert [d["message"]["payload"] for d in taken.json()] == [{"job": "late"}]
    assert 0.15 < time.monotonic() - started < 5


async def test_a_long_poll_does_not_block_the_event_loop(
    kw: Klockwork, app: FastAPI, keys: Keys
) -> None:
    kw.bus.create_group("jobs", "workers")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        waiting = asyncio.create_task(
            client.post(
                "/v1/bus/jobs/subscribe",
                headers=bearer(keys.agent),
                json={"group": "workers", "consumer": "w1", "wait_s": 10},
            )
        )
        await asyncio.sleep(0.1)
        # Same loop: answered while the subscribe waits, then its publish wakes it.
        sent = await client.post(
            "/v1/bus/jobs/publish", headers=bearer(keys.admin), json={"payload": {"n": 1}}
        )
        assert sent.status_code == 200
        taken = await asyncio.wait_for(waiting, 5)
    assert [d["message"]["seq"] for d in taken.json()] == [1]


async def test_a_subscriber_that_hangs_up_while_waiting_takes_nothing(
    kw: Klockwork, app: FastAPI, keys: Keys
) -> None:
    kw.bus.create_group("jobs", "workers")
    ask = {"group": "workers", "consumer": "w1", "wait_s": 10}
    client = HangingUpClient(app, "/v1/bus/jobs/subscribe", ask, keys.agent)
    call = client.start()
    await asyncio.sleep(0.2)
    client.hang_up()
    await asyncio.wait_for(call, 5)  # it stopped waiting: no 10 s
    kw.bus.publish("jobs", {"job": "after"})
    [delivery] = await kw.bus.asubscribe("jobs", "workers", "w2")
    assert delivery.attempt == 1 and delivery.consumer == "w2"


def test_nack_redelivers_and_the_last_attempt_is_a_dead_letter(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.bus.create_group("jobs", "workers", max_deliveries=2)
    kw.bus.publish("jobs", {"card": "bad"})
    for attempt in (1, 2):
        [delivery] = _read(client, keys.agent).json()
        assert delivery["attempt"] == attempt
        nacked = client.post(
            "/v1/bus/jobs/nack",
            headers=bearer(keys.agent),
            json={"group": "workers", "message_ids": [delivery["message"]["id"]], "error": "no"},
        )
        assert nacked.json() == {"nacked": 1}
    assert _read(client, keys.agent).json() == []
    [letter] = client.get("/v1/bus/jobs.dead/peek", headers=bearer(keys.agent)).json()
    assert letter["payload"]["last_error"] == "no"
    assert letter["payload"]["last_consumer"] == "builder:w1"


def test_channels_and_groups_are_listed_for_any_key(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    kw.bus.create_group("jobs", "workers")
    kw.bus.publish("jobs", {"n": 1})
    channels = client.get("/v1/bus/channels", headers=bearer(keys.approver)).json()
    [jobs] = [c for c in channels if c["channel"] == "jobs"]
    assert jobs["last_seq"] == 1 and jobs["groups"] == ["workers"]
    groups = client.get(
        "/v1/bus/groups", params={"channel": "jobs"}, headers=bearer(keys.agent)
    ).json()
    assert [(g["group"], g["lag"]) for g in groups] == [("workers", 1)]
    every = client.get("/v1/bus/groups", headers=bearer(keys.admin)).json()
    assert "workers" in [g["group"] for g in every]


def test_an_approver_may_look_but_not_publish_or_consume(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    for path, body in (
        ("/v1/bus/jobs/publish", {"payload": {}}),
        ("/v1/bus/jobs/subscribe", {"group": "g", "consumer": "c"}),
        ("/v1/bus/jobs/ack", {"group": "g", "message_ids": ["x"]}),
    ):
        refused = client.post(path, headers=bearer(keys.approver), json=body)
        assert refused.status_code == 403, path
        assert kw.audit.query(kind="access.denied").entries[-1].data["path"] == path
    assert kw.bus.channels() == []


def test_nobody_publishes_governance_events_and_agents_do_not_read_them(
    kw: Klockwork, client: TestClient, keys: Keys
) -> None:
    for key in (keys.agent, keys.admin):
        forged = client.post(
            f"/v1/bus/{EVENTS_CHANNEL}/publish",
            headers=bearer(key),
            json={"payload": {"kind": "approval.decided"}},
        )
        assert forged.status_code == 403
        assert forged.json()["error"]["type"] == "reserved_channel"
    entry = kw.audit.query(kind="access.denied").entries[-1]
    assert entry.data["reason"] == "reserved_channel" and entry.data["channel"] == EVENTS_CHANNEL
    peek = f"/v1/bus/{EVENTS_CHANNEL}/peek"
    assert client.get(peek, headers=bearer(keys.agent)).status_code == 403
    assert client.get(peek, headers=bearer(keys.approver)).status_code == 200
    read = client.post(
        f"/v1/bus/{EVENTS_CHANNEL}/subscribe",
        headers=bearer(keys.agent),
        json={"group": "spy", "consumer": "me"},
    )
    assert read.status_code == 403 and kw.bus.groups(EVENTS_CHANNEL) == []


@pytest.mark.parametrize(
    ("path", "body", "argument"),
    [
        ("/v1/bus/jobs/publish", {"payload": [1]}, "payload"),
        ("/v1/bus/jobs/publish", {"payload": {}, "deliver_at": -1}, "deliver_at"),
        ("/v1/bus/jobs/publish", {"payload": {}, "key": ""}, "key"),
        ("/v1/bus/bad name/publish", {"payload": {}}, "channel"),
        ("/v1/bus/jobs/subscribe", {"group": "g", "consumer": "a:b"}, "consumer"),
        ("/v1/bus/jobs/subscribe", {"group": "g", "consumer": "c", "wait_s": 31}, "wait_s"),
        ("/v1/bus/jobs/subscribe", {"group": "g", "consumer": "c", "max_messages": 0}, None),
        ("/v1/bus/jobs/subscribe", {"group": "g g", "consumer": "c"}, "group"),
        ("/v1/bus/jobs/ack", {"group": "g", "message_ids": []}, "message_ids"),
        ("/v1/bus/jobs/ack", {"group": "nobody", "message_ids": ["m"]}, "group"),
    ],
)
def test_bad_input_is_422_naming_the_argument_and_changes_nothing(
    kw: Klockwork,
    client: TestClient,
    keys: Keys,
    path: str,
    body: dict[str, object],
    argument: str | None,
) -> None:
    answer = client.post(path, headers=bearer(keys.admin), json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["argument"] == (argument or "max_messages")
    assert kw.bus.channels() == []


def test_a_payload_json_cannot_hold_is_refused(client: TestClient, keys: Keys) -> None:
    answer = client.post(
        "/v1/bus/jobs/publish",
        headers={**bearer(keys.agent), "Content-Type": "application/json"},
        content=b'{"payload": {"x": NaN}}',
    )
    assert answer.status_code == 422 and answer.json()["error"]["argument"] == "payload"


def test_peek_arguments_are_checked(client: TestClient, keys: Keys) -> None:
    for params, argument in (({"limit": 0}, "limit"), ({"after_seq": -1}, "after_seq")):
        answer = client.get("/v1/bus/jobs/peek", params=params, headers=bearer(keys.agent))
        assert answer.status_code == 422 and answer.json()["error"]["argument"] == argument
    assert client.get("/v1/bus/jobs/peek", headers=bearer(keys.agent)).json() == []
