"""What the adversarial probe of the bus broke, pinned (memory and SQLite)."""

from __future__ import annotations

import threading
import time

import pytest

from klockwork import InvalidRequestError, Klockwork


@pytest.fixture
def kw(any_kw: Klockwork) -> Klockwork:
    return any_kw


def test_a_payload_near_the_limit_still_becomes_a_dead_letter(kw: Klockwork) -> None:
    bus = kw.bus
    bus.create_group("big", "g", max_deliveries=1)
    bus.publish("big", {"blob": "x" * ((1 << 20) - 20)})  # its dead letter is over 1 MiB
    bus.publish("big", {"n": 2})
    [first] = bus.subscribe("big", "g", "c", max_messages=1)
    bus.nack("big", "g", [first], error="too big to handle")
    [second] = bus.subscribe("big", "g", "c", max_messages=5)  # buries the first
    assert second.payload == {"n": 2}
    [letter] = bus.peek("big.dead")
    assert letter.payload["message"]["seq"] == 1
    assert letter.payload["last_error"] == "too big to handle"


def test_an_await_counts_a_message_it_holds_once(kw: Klockwork) -> None:
    bus = kw.bus
    bus.create_group("a", "g", visibility_timeout_s=0.05, start="earliest")
    bus.publish("a", {"only": 1})
    result = bus.await_channels(["a"], mode="at_least", n=3, group="g", wait_s=0.4)
    assert result.timed_out and not result.satisfied
    assert [m.seq for m in result.messages["a"]] == [1]
    [again] = bus.subscribe("a", "g", "c")  # handed back: consumed nothing
    assert (again.message.seq, again.attempt) == (1, 1)  # the await's holding cost no attempt
    assert bus.peek("a.dead") == []


def test_a_timed_out_await_leaves_alone_what_another_consumer_holds(kw: Klockwork) -> None:
    bus = kw.bus
    bus.create_group("a", "g", visibility_timeout_s=0.2, start="earliest")
    bus.create_group("b", "g", start="earliest")
    bus.publish("a", {"n": 1})
    taken: list[int] = []

    def bob() -> None:
        time.sleep(0.35)  # the await's delivery has timed out by now
        taken.extend(d.attempt for d in bus.subscribe("a", "g", "bob"))

    thread = threading.Thread(target=bob)
    thread.start()
    result = bus.await_channels(["a", "b"], mode="all", group="g", wait_s=0.5)
    thread.join()
    assert result.timed_out and taken == [2]
    assert bus.subscribe("a", "g", "carol") == []  # still bob's, attempt not undone


def test_an_await_key_belongs_to_its_group_and_channels(kw: Klockwork) -> None:
    bus = kw.bus
    for group in ("g1", "g2"):
        for channel in ("a", "b"):
            bus.create_group(channel, group, start="earliest")
    bus.publish("a", {"n": 1})
    first = bus.await_channels(["a"], group="g1", key="step-1", wait_s=0)
    assert first.satisfied
    other = bus.await_channels(["b"], group="g2", key="step-1", wait_s=0)
    assert not other.satisfied and other.messages == {"b": []}
    again = bus.await_channels(["a"], group="g1", key="step-1", wait_s=0)
    assert again.messages == first.messages  # the same step, its stored result


def test_dead_letters_of_long_names_can_be_read(kw: Klockwork) -> None:
    name = "x" * 195 + ".dead"  # 200 characters, itself a dead-letter-looking name
    kw.bus.create_group(name, "g", max_deliveries=1)
    kw.bus.publish(name, {"n": 1})
    [d] = kw.bus.subscribe(name, "g", "c")
    kw.bus.nack(name, "g", [d])
    kw.bus.subscribe(name, "g", "c")
    assert [m.payload["attempts"] for m in kw.bus.peek(name + ".dead")] == [1]
    with pytest.raises(InvalidRequestError):
        kw.bus.publish("y" * 201, {})


def test_a_governance_event_too_large_for_the_bus_is_published_without_its_data(
    kw: Klockwork,
) -> None:
    kinds: list[str] = []
    kw.bus.on("klockwork.events", lambda m: kinds.append(m.payload["kind"]))
    kw.gates.execute("a1", "upload", {"blob": "x" * 1_100_000})
    verdict = kw.leases.try_acquire("a1", "s", ("FILE:/x", "MUTATES"))
    kw.leases.release(verdict.leases[0].lease_id)
    deadline = time.monotonic() + 5
    while len(kinds) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kinds[-2:] == ["lease.granted", "lease.released"]
    [denied] = [m for m in kw.bus.peek("klockwork.events") if m.payload["kind"] == "action.denied"]
    assert "omitted" in denied.payload["data"]


def test_a_far_delayed_message_is_scheduled_not_rescanned(kw: Klockwork) -> None:
    bus = kw.bus
    bus.create_group("jobs", "g", start="earliest")
    now = int(time.time() * 1000)
    later = bus.publish("jobs", {"remind": True}, deliver_at=now + 300)
    for i in range(20):
        bus.publish("jobs", {"n": i})
    got = bus.subscribe("jobs", "g", "c", max_messages=100)
    assert [d.payload["n"] for d in got] == list(range(20))
    bus.ack("jobs", "g", got)
    [info] = bus.groups("jobs")
    assert (info.pending, info.lag) == (0, 0)  # the delayed one is nobody's yet, not visible
    assert bus.ack("jobs", "g", [later.id]) == 0  # nobody holds it: nothing to ack
    [reminder] = bus.subscribe("jobs", "g", "c", wait_s=5)  # woken when it becomes visible
    assert (reminder.message.seq, reminder.attempt) == (1, 1)
    assert int(time.time() * 1000) >= later.visible_at
