"""``klockwork bus``: publish, peek, tail (and --follow across processes), groups, channels."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from klockwork import Klockwork
from klockwork.cli import OK, USAGE, main


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[str, Klockwork]]:
    url = f"sqlite:///{tmp_path / 'kw.db'}"
    with Klockwork.open(url) as kw:
        yield url, kw


def lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_publish_prints_the_message_and_another_engine_sees_it(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    assert main(["bus", "publish", "jobs", '{"pr": 42}', "--url", url]) == OK
    printed = json.loads(capsys.readouterr().out)
    (message,) = kw.bus.peek("jobs")
    assert printed == {
        "id": message.id,
        "channel": "jobs",
        "seq": 1,
        "payload": {"pr": 42},
        "published_at": message.published_at,
        "visible_at": message.visible_at,
    }


def test_publish_with_a_key_publishes_once(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    args = ["bus", "publish", "jobs", '{"n": 1}', "--key", "k1", "--url", url]
    assert main(args) == OK
    assert main(args) == OK
    first, again = capsys.readouterr().out.splitlines()
    assert first == again and len(kw.bus.peek("jobs")) == 1


def test_publish_deliver_at_hides_the_message_until_then(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    later = kw.clock.now_ms() + 3_600_000
    assert main(["bus", "publish", "jobs", "{}", "--deliver-at", str(later), "--url", url]) == OK
    assert json.loads(capsys.readouterr().out)["visible_at"] == later
    assert kw.bus.peek("jobs") == []
    assert main(["bus", "peek", "jobs", "--url", url]) == OK
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["publish", "jobs", "{not json"], "not valid JSON"),
        (["publish", "jobs", "[1, 2]"], "must be a JSON object, got list"),
        (["publish", "jobs", '"text"'], "must be a JSON object, got str"),
        (["publish", "no spaces", "{}"], "channel"),
        (["publish", "jobs", "{}", "--key", ""], "key"),
        (["publish", "jobs", "{}", "--deliver-at", "-5"], "deliver_at"),
        (["peek", "bad/channel"], "channel"),
        (["peek", "jobs", "--limit", "0"], "limit"),
        (["peek", "jobs", "--after", "-1"], "after"),
        (["tail", "bad/channel"], "channel"),
        (["tail", "jobs", "--follow", "--interval", "0"], "--interval"),
        (["groups", "bad/channel"], "channel"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(
    store: tuple[str, Klockwork],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    says: str,
) -> None:
    url, kw = store
    assert main(["bus", *args, "--url", url]) == USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("klockwork: ") and says in line
    assert kw.bus.channels() == []  # nothing was published


def test_bad_input_in_a_subprocess_has_no_traceback(store: tuple[str, Klockwork]) -> None:
    url, _ = store
    done = subprocess.run(
        [sys.executable, "-m", "klockwork.cli", "bus", "publish", "jobs", "[]", "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == USAGE
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_bus_commands_need_a_shared_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLOCKWORK_URL", raising=False)
    assert main(["bus", "peek", "jobs"]) == USAGE
    assert "no store given" in capsys.readouterr().err
    assert main(["bus", "publish", "jobs", "{}", "--url", "memory://"]) == USAGE
    missing = tmp_path / "missing.db"
    assert main(["bus", "channels", "--url", f"sqlite:///{missing}"]) == USAGE
    assert not missing.exists()


def test_the_url_may_come_from_the_environment(
    store: tuple[str, Klockwork],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, kw = store
    monkeypatch.setenv("KLOCKWORK_URL", url)
    assert main(["bus", "publish", "jobs", '{"env": true}']) == OK
    assert kw.bus.peek("jobs")[0].payload == {"env": True}


def test_peek_replays_without_consuming(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    kw.bus.create_group("jobs", "workers")
    for i in range(5):
        kw.bus.publish("jobs", {"i": i})
    assert main(["bus", "peek", "jobs", "--url", url]) == OK
    assert [m["seq"] for m in lines(capsys.readouterr().out)] == [1, 2, 3, 4, 5]
    assert main(["bus", "peek", "jobs", "--after", "2", "--limit", "2", "--url", url]) == OK
    assert [m["payload"] for m in lines(capsys.readouterr().out)] == [{"i": 2}, {"i": 3}]
    assert main(["bus", "peek", "nothing.here", "--url", url]) == OK
    assert capsys.readouterr().out == ""
    assert len(kw.bus.subscribe("jobs", "workers", "c")) == 5  # nothing was consumed


def test_tail_prints_the_last_messages(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    for i in range(12):
        kw.bus.publish("jobs", {"i": i})
    assert main(["bus", "tail", "jobs", "--url", url]) == OK
    assert [m["seq"] for m in lines(capsys.readouterr().out)] == list(range(3, 13))
    assert main(["bus", "tail", "jobs", "-n", "3", "--url", url]) == OK
    assert [m["seq"] for m in lines(capsys.readouterr().out)] == [10, 11, 12]
    assert main(["bus", "tail", "jobs", "-n", "50", "--url", url]) == OK
    assert len(lines(capsys.readouterr().out)) == 12
    assert main(["bus", "tail", "jobs", "-n", "0", "--url", url]) == OK
    assert capsys.readouterr().out == ""
    assert main(["bus", "tail", "empty", "--url", url]) == OK
    assert capsys.readouterr().out == ""


def test_tail_skips_messages_not_yet_visible(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    for i in range(4):
        kw.bus.publish("jobs", {"i": i})
    kw.bus.publish("jobs", {"later": True}, deliver_at=kw.clock.now_ms() + 3_600_000)
    assert main(["bus", "tail", "jobs", "-n", "2", "--url", url]) == OK
    assert [m["seq"] for m in lines(capsys.readouterr().out)] == [3, 4]


def test_tail_follow_prints_what_another_process_publishes_until_ctrl_c(
    store: tuple[str, Klockwork],
) -> None:
    url, kw = store
    kw.bus.publish("jobs", {"n": 1})
    args = ["bus", "tail", "jobs", "-n", "1", "--follow", "--interval", "0.05", "--url", url]
    proc = subprocess.Popen(
        [sys.executable, "-m", "klockwork.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["payload"] == {"n": 1}
        url_arg = ["--url", url]
        publisher = subprocess.run(
            [sys.executable, "-m", "klockwork.cli", "bus", "publish", "jobs", '{"n": 2}', *url_arg],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # another process
        assert publisher.returncode == OK, publisher.stderr
        seen = json.loads(proc.stdout.readline())
        assert seen["payload"] == {"n": 2} and seen["seq"] == 2
        kw.bus.publish("jobs", {"n": 3})  # and this process
        assert json.loads(proc.stdout.readline())["seq"] == 3
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == OK
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_groups_and_channels_tables(
    store: tuple[str, Klockwork], capsys: pytest.CaptureFixture[str]
) -> None:
    url, kw = store
    assert main(["bus", "groups", "--url", url]) == OK
    assert capsys.readouterr().out == "no groups\n"
    assert main(["bus", "channels", "--url", url]) == OK
    assert capsys.readouterr().out == "no channels\n"

    kw.bus.create_group("jobs", "workers", visibility_timeout_s=5, max_deliveries=3)
    kw.bus.create_group("mail", "senders")
    for i in range(3):
        kw.bus.publish("jobs", {"i": i})
    kw.bus.subscribe("jobs", "workers", "c1", max_messages=1)  # one in flight, two waiting

    assert main(["bus", "groups", "--url", url]) == OK
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.startswith("CHANNEL") and header.endswith("VISIBILITY  MAX DELIVERIES")
    assert ["jobs", "workers", "1", "2", "5", "s", "3"] in [row.split() for row in rows]
    assert len(rows) == 2

    assert main(["bus", "groups", "jobs", "--json", "--url", url]) == OK
    (group,) = json.loads(capsys.readouterr().out)
    assert group["group"] == "workers" and group["pending"] == 1 and group["lag"] == 2
    assert group["visibility_timeout_s"] == 5 and group["max_deliveries"] == 3
    assert main(["bus", "groups", "nothing", "--url", url]) == OK
    assert capsys.readouterr().out == "no groups on nothing\n"

    assert main(["bus", "channels", "--url", url]) == OK
    out = capsys.readouterr().out
    assert "LAST SEQ" in out and "workers" in out
    assert main(["bus", "channels", "--json", "--url", url]) == OK
    channels = {c["channel"]: c for c in json.loads(capsys.readouterr().out)}
    assert channels["jobs"]["last_seq"] == 3 and channels["jobs"]["groups"] == ["workers"]
