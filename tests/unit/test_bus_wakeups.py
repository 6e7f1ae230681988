"""Dead letters wake their waiters and listeners; bus results serialise by field name."""

from __future__ import annotations

import threading
import time

import pytest

from klockwork import Klockwork, Message


@pytest.fixture
def kw(any_kw: Klockwork) -> Klockwork:
    return any_kw


def test_a_dead_letter_wakes_its_waiter_and_its_listeners(kw: Klockwork) -> None:
    bus = kw.bus
    bus.create_group("tasks", "w", max_deliveries=1)
    bus.create_group("tasks.dead", "ops", start="earliest")
    heard: list[Message] = []
    bus.on("*.dead", heard.append)
    bus.publish("tasks", {"n": 1})

    def fail_it() -> None:
        time.sleep(0.1)
        [delivery] = bus.subscribe("tasks", "w", "worker")
        bus.nack("tasks", "w", [delivery], error="boom")
        assert bus.subscribe("tasks", "w", "worker") == []  # the read that buries it

    worker = threading.Thread(target=fail_it)
    worker.start()
    started = time.monotonic()
    letters = bus.subscribe("tasks.dead", "ops", "me", wait_s=5)
    waited = time.monotonic() - started
    worker.join()
    assert [d.payload["last_error"] for d in letters] == ["boom"]
    assert waited < 2.0  # woken by the burial, not by the end of the wait
    assert [m.channel for m in heard] == ["tasks.dead"]


def test_results_serialise_through_pydantic_as_objects(kw: Klockwork) -> None:
    from pydantic import TypeAdapter

    from klockwork import AwaitResult, Delivery

    message = kw.bus.publish("a", {"x": [1, 2]})
    kw.bus.create_group("a", "g", start="earliest")
    [delivery] = kw.bus.subscribe("a", "g", "c")
    as_json = TypeAdapter(Delivery).dump_python(delivery, mode="json")
    assert as_json["message"]["payload"] == {"x": [1, 2]} and as_json["attempt"] == 1
    assert (
        TypeAdapter(Delivery).validate_json(TypeAdapter(Delivery).dump_json(delivery)) == delivery
    )
    assert TypeAdapter(Message).validate_python(message.to_dict()) == message
    result = TypeAdapter(AwaitResult).dump_python(AwaitResult(True, False, {"a": [message]}))
    assert result["messages"]["a"][0]["id"] == message.id
