"""In-process wake-ups: the epoch closes the register/notify race (klockwork.core.notify)."""

from __future__ import annotations

from klockwork.core.clock import ThreadAlarm
from klockwork.core.notify import Signals


def test_notify_fires_alarms_on_the_key_only() -> None:
    signals = Signals()
    a, b = ThreadAlarm(), ThreadAlarm()
    assert signals.register(["k1"], signals.epoch, a)
    assert signals.register(["k2"], signals.epoch, b)
    assert signals.waiting == 2
    signals.notify("k1")
    assert a.fired and not b.fired
    assert signals.waiting == 1
    signals.unregister(["k2"], b)
    assert signals.waiting == 0


def test_a_notification_between_read_and_register_is_not_lost() -> None:
    signals = Signals()
    epoch = signals.epoch  # 1. the waiter reads the epoch, asks the store: WAIT
    signals.notify("k")  # 2. the holder releases before the waiter registers
    alarm = ThreadAlarm()
    assert signals.register(["k"], epoch, alarm) is False  # 3. told to retry at once
    assert signals.waiting == 0


def test_epoch_never_returns_to_an_old_value() -> None:
    signals = Signals()
    seen = {signals.epoch}
    for i in range(100):
        signals.notify(f"k{i % 3}")
        assert signals.epoch not in seen
        seen.add(signals.epoch)


def test_one_alarm_on_several_keys() -> None:
    signals = Signals()
    alarm = ThreadAlarm()
    assert signals.register(["a", "b"], signals.epoch, alarm)
    signals.notify("b")
    assert alarm.fired
    signals.unregister(["a", "b"], alarm)
    assert signals.waiting == 0


def test_remote_wake_ups_wake_one_key_or_every_keyed_waiter() -> None:
    signals = Signals()
    a, b, c = ThreadAlarm(), ThreadAlarm(), ThreadAlarm()
    assert signals.register(["k1"], signals.epoch, a)
    assert signals.register(["k2", "k3"], signals.epoch, b)
    signals.notify_remote("k1")  # another process released k1
    assert a.fired and not b.fired
    assert signals.register(["k4"], signals.epoch, c)
    epoch = signals.epoch
    signals.notify_remote("*")  # wake-ups were missed: everyone re-checks
    assert b.fired and c.fired
    assert signals.waiting == 0
    assert signals.epoch != epoch  # a waiter between read and register retries too
