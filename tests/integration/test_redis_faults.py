"""The Redis store when its server fails: killed, frozen, restarted, read-only, volatile.

Each test starts a ``redis-server`` of its own on a free loopback port
(:mod:`redis_server`), never the shared one of ``KLOCKWORK_TEST_REDIS_URL``,
and kills it with SIGKILL (a crash: no shutdown, no final save) or freezes
it with SIGSTOP (a server that accepts connections and never answers).
Servers that must keep their data across a restart run with
``--appendonly yes --appendfsync always``.

What must hold (issue 13, "Fail closed"; DESIGN.md, "Durability"):

* every call while Redis is down raises :class:`~klockwork.StoreUnavailableError`
  (typed, never a raw redis error), within the store's socket timeout; no
  grant, approval or message is handed out;
* after a restart the engine recovers without being reopened, and nothing
  is granted twice: a lease granted before the crash still excludes others,
  fencing tokens keep increasing;
* a decision the caller saw has its audit entry, and no entry exists for a
  decision the caller saw fail;
* an acked message is never redelivered, a published one never lost.

Where the store cannot hold a guarantee yet the test is ``xfail(strict=True)``
with the reason: a gap for the store's authors, not a flaky test.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_server import RedisServer, redis_server_available

from klockwork import Effect, Klockwork, Policy, StoreUnavailableError, VerdictStatus
from klockwork.core.governance.outcomes import GateRecord
from klockwork.core.stores.redis import connection, scripts

pytestmark = pytest.mark.skipif(
    not redis_server_available(),
    reason="fault tests start their own redis-server: install redis-server (apt install "
    "redis-server) to run them",
)

NS = "faults"
#: The store's own bound on one command (seconds); a call may send once more.
SOCKET_TIMEOUT_S = connection.SOCKET_TIMEOUT_S
#: Slack for a loaded CI machine on top of a timeout.
SLACK_S = 1.5


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A persistent server (AOF, fsync on every write), killed at teardown."""
    with RedisServer(tmp_path / "redis", aof=True) as srv:
        yield srv


@pytest.fixture
def engines() -> Iterator[Callable[[str], Klockwork]]:
    """Opens engines (``Klockwork.open``) and closes them all at teardown."""
    opened: list[Klockwork] = []

    def open_(url: str) -> Klockwork:
        kw = Klockwork.open(url)
        opened.append(kw)
        return kw

    yield open_
    for kw in opened:
        kw.close()


@dataclass
class Call:
    """One timed call made while the server may be failing."""

    started: float
    ended: float
    result: Any = None
    error: BaseException | None = None


def timed(fn: Callable[[], Any]) -> Call:
    """Run ``fn`` and keep its result or its exception, with monotonic start and end."""
    started = time.monotonic()
    try:
        result = fn()
    except Exception as exc:  # kept for the assertions: any type, typed or not
        return Call(started, time.monotonic(), error=exc)
    return Call(started, time.monotonic(), result=result)


def assert_failed_closed(calls: list[Call], bound_s: float) -> None:
    """Every call failed with StoreUnavailableError, none took longer than ``bound_s``."""
    assert calls, "no call was made while the server was down"
    untyped = [repr(c.error) for c in calls if not isinstance(c.error, StoreUnavailableError)]
    assert not untyped, f"calls that did not fail closed: {untyped[:5]}"
    slowest = max(c.ended - c.started for c in calls)
    assert slowest <= bound_s, f"a call took {slowest:.2f}s while the server was down"


# -- leases --------------------------------------------------------------------------------
@dataclass
class Looper:
    """A thread calling ``call(i)`` for i = 1, 2, ... until stopped, timing each call."""

    call: Callable[[int], Any]
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            self.calls.append(timed(partial(self.call, i)))
            if self.calls[-1].error is not None:
                time.sleep(0.005)  # down: keep asking, without spinning a CPU


def acquiring(kw: Klockwork) -> Looper:
    """A looper acquiring one new resource after another."""
    return Looper(
        lambda i: kw.leases.try_acquire("looper", "s", (f"FILE:/loop/{i}", "MUTATES"), 120_000)
    )


def gating(kw: Klockwork) -> Looper:
    """A looper executing gates (each one audit entry)."""
    return Looper(lambda i: kw.gates.execute("gater", "read", {"n": i}))


def test_a_server_killed_mid_acquire_fails_closed_and_never_grants_twice(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """SIGKILL while a thread acquires in a loop; restart from the AOF.

    Proves: while down, every acquire (the looping one's and another
    engine's) raises StoreUnavailableError at once (connection refused, far
    under the socket timeout) and nothing is granted; after the restart the
    same engines work again without being reopened, every lease granted
    before the crash is still held (the holder of ``FILE:/held`` still
    excludes an intruder from another engine), and fencing tokens continue
    above every token handed out before (no token is issued twice).
    """
    url = server.url(NS)
    kw, other = engines(url), engines(url)
    held = kw.leases.try_acquire("holder", "s", ("FILE:/held", "MUTATES"), 120_000)
    assert held.granted
    looper = acquiring(kw)
    thread = threading.Thread(target=looper.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while sum(c.error is None for c in looper.calls) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()
        killed_at = time.monotonic()
        while_down = [
            timed(lambda: other.leases.try_acquire("intruder", "s", ("FILE:/held", "MUTATES")))
            for _ in range(5)
        ]
        time.sleep(0.3)  # the looper keeps failing meanwhile
        restarting_at = time.monotonic()
        server.restart()
        time.sleep(0.3)
    finally:
        looper.stop.set()
        thread.join(10)
    assert not thread.is_alive()

    during = [c for c in looper.calls if c.started > killed_at and c.ended < restarting_at]
    assert_failed_closed(during + while_down, bound_s=1.0)
    granted_before = [
        c.result.lease for c in looper.calls if c.error is None and c.ended < killed_at
    ]
    assert len(granted_before) >= 50
    after = [c for c in looper.calls if c.started > restarting_at]
    assert after and all(c.error is None and c.result.granted for c in after[-5:]), (
        "the engine did not recover after the restart"
    )

    # Nothing granted before the crash was lost: all still held, by their holder.
    live = {lease.lease_id: lease for lease in other.leases.list(agent_id="looper")}
    assert {lease.lease_id for lease in granted_before} <= set(live)
    assert other.leases.get(held.lease.lease_id).state.value == "ACTIVE"  # type: ignore[union-attr]
    intruder = other.leases.try_acquire("intruder", "s", ("FILE:/held", "MUTATES"))
    assert intruder.status is not VerdictStatus.GRANTED, "granted twice across the crash"
    other.leases.check_fencing("FILE:/held", held.lease.fencing_token)  # still the valid token

    # Tokens kept increasing across the restart: one counter, persisted.
    before = max(lease.fencing_token for lease in granted_before)
    fresh = other.leases.try_acquire("newcomer", "s", ("FILE:/fresh", "MUTATES"))
    assert fresh.granted and fresh.lease.fencing_token > before


def test_a_frozen_server_fails_closed_within_the_socket_timeout(
    server: RedisServer, engines: Callable[[str], Klockwork], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP: the server accepts connections and never answers.

    Proves: a lease request, a gate and a publish each raise
    StoreUnavailableError within twice the store's socket timeout (the
    command, then its one resend under the same request id) plus slack —
    never a hang — and after SIGCONT the engine answers again, unreopened.
    The timeout is cut to 1 s here to keep the test short; with the default
    (5 s) a lease request takes 10 s to fail, a gate 5 s.
    """
    monkeypatch.setattr(connection, "SOCKET_TIMEOUT_S", 1.0)  # read when the store opens
    kw = engines(server.url(NS))
    kw.policies.add(Policy(name="ok", action="read", effect=Effect.ALLOW))
    assert kw.leases.try_acquire("warm", "s", ("FILE:/warm", "MUTATES")).granted
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        calls = [
            timed(lambda: kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))),
            timed(lambda: kw.gates.execute("a", "read", {})),
            timed(lambda: kw.bus.publish("frozen", {"n": 1})),
        ]
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert_failed_closed(calls, bound_s=2 * 1.0 + SLACK_S)
    assert kw.gates.execute("a", "read", {}).status == "executed"
    assert kw.leases.try_acquire("b", "s", ("FILE:/y", "MUTATES")).granted


def test_a_grant_committed_after_the_caller_gave_up_is_audited(
    server: RedisServer, engines: Callable[[str], Klockwork], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant the caller never saw (its reply lost) is audited, or undone, not left silent.

    The server is frozen past the socket timeout while a lease request is in
    flight: the caller gets StoreUnavailableError, yet the server runs the
    queued script when it resumes. Proves: no lease stays ACTIVE on Redis
    without a ``lease.granted`` entry (the store resolves the lost request
    at its next call: audits the grant and gives it back), so ``verify``
    never vouches for a trail with a silent gap.
    """
    monkeypatch.setattr(connection, "SOCKET_TIMEOUT_S", 0.4)  # the store reads it when opened
    kw = engines(server.url(NS))
    assert kw.leases.try_acquire("warm", "s", ("FILE:/warm", "MUTATES")).granted
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        lost = timed(lambda: kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"), 120_000))
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert isinstance(lost.error, StoreUnavailableError)
    time.sleep(0.3)  # the resumed server runs what it had received
    committed = kw.leases.list(agent_id="a")
    audited = {e.data.get("lease_id") for e in kw.audit.query(kind="lease.granted").entries}
    unaudited = [lease.lease_id for lease in committed if lease.lease_id not in audited]
    assert not unaudited, f"grants on Redis without an audit entry: {unaudited}"


def test_the_async_twins_fail_closed_and_recover(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """The ``redis.asyncio`` half while the server is down, then after its restart.

    Proves: ``atry_acquire``, ``aacquire``, ``arelease``, ``aheartbeat``,
    ``apublish``, ``asubscribe`` and ``agate`` each raise
    StoreUnavailableError at once (no raw redis error, no hang), and the
    async client works again after the restart without reopening; the lease
    held across the crash still excludes another agent.
    """
    kw = engines(server.url(NS))
    kw.policies.add(Policy(name="ok", action="read", effect=Effect.ALLOW))

    async def go() -> tuple[list[Call], bool, bool]:
        held = await kw.leases.atry_acquire("a", "s", ("FILE:/x", "MUTATES"), 120_000)
        await kw.bus.apublish("c", {"n": 1})
        server.kill()
        calls = []
        for make in (
            lambda: kw.leases.atry_acquire("b", "s", ("FILE:/y", "MUTATES")),
            lambda: kw.leases.aacquire("b", "s", ("FILE:/x", "MUTATES"), timeout_s=5),
            lambda: kw.leases.arelease(held.lease.lease_id),
            lambda: kw.leases.aheartbeat(held.lease.lease_id),
            lambda: kw.bus.apublish("c", {"n": 2}),
            lambda: kw.bus.asubscribe("c", "g", "c1", wait_s=3),
            lambda: kw.gates.agate("a", "read", {}),
        ):
            started = time.monotonic()
            try:
                calls.append(Call(started, time.monotonic(), result=await make()))
            except Exception as exc:
                calls.append(Call(started, time.monotonic(), error=exc))
        server.restart()
        fresh = await kw.leases.atry_acquire("b", "s", ("FILE:/y", "MUTATES"))
        blocked = await kw.leases.atry_acquire("b", "s", ("FILE:/x", "MUTATES"))
        return calls, fresh.granted, blocked.granted

    calls, fresh, blocked = asyncio.run(go())
    assert_failed_closed(calls, bound_s=1.0)
    assert fresh and not blocked


def test_an_open_engine_notices_a_server_that_came_back_empty(
    tmp_path: Path, engines: Callable[[str], Klockwork]
) -> None:
    """A volatile server restarts (its data gone) under an engine holding a lease.

    Proves: the open engine does not hand the lost lease
    to someone else with a token that is not newer than the old holder's:
    it fails closed (StoreUnavailableError), refuses, or keeps tokens
    increasing.
    """
    with RedisServer(tmp_path / "volatile", aof=False) as volatile, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the persistence warning, if any, is another test's
        kw = engines(volatile.url(NS))
        for i in range(5):  # a few tokens handed out before the restart
            held = kw.leases.try_acquire(f"a{i}", "s", (f"FILE:/x{i}", "MUTATES"), 120_000)
        assert held.granted
        volatile.restart()
        try:
            again = kw.leases.try_acquire("b", "s", ("FILE:/x4", "MUTATES"), 120_000)
        except StoreUnavailableError:
            return  # failed closed: the engine noticed
        assert not again.granted or again.lease.fencing_token > held.lease.fencing_token, (
            f"granted again with token {again.lease.fencing_token} "
            f"(the holder before the restart has {held.lease.fencing_token})"
        )


def test_votes_while_the_server_is_down_fail_closed_and_count_once_after(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """An approval pending when the server is killed; votes while down, by API and by CLI.

    Proves: ``approvals.approve`` and ``approvals.list`` raise
    StoreUnavailableError and ``klockwork approvals approve`` exits 3
    (unavailable) with no traceback while Redis is down; nothing is
    decided. After the restart (AOF) the approval is still pending, one
    vote approves it, and exactly one ``approval.decided`` entry exists.
    """
    url = server.url(NS)
    kw = engines(url)
    kw.policies.add(
        Policy(name="ask", action="deploy", effect=Effect.REQUIRE_APPROVAL, approvers=["alice"])
    )
    approval_id = kw.gates.execute("dev", "deploy", {}).approval_id
    assert approval_id is not None
    server.kill()
    calls = [
        timed(lambda: kw.approvals.approve(approval_id, "alice")),
        timed(lambda: kw.approvals.list()),
    ]
    assert_failed_closed(calls, bound_s=1.0)
    cli = subprocess.run(
        [sys.executable, "-m", "klockwork.cli", "approvals", "approve", approval_id,
         "--approver", "alice", "--url", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 3, cli.stdout + cli.stderr
    assert "Traceback" not in cli.stderr, cli.stderr
    server.restart()
    assert kw.approvals.get(approval_id).status.value == "pending"
    assert kw.approvals.approve(approval_id, "alice").status.value == "approved"
    decided = kw.audit.query(kind="approval.decided").entries
    assert [e.data.get("approval_id") for e in decided] == [approval_id]


# -- the audit trail -------------------------------------------------------------------------
def _killed_mid_gates(server: RedisServer, kw: Klockwork) -> list[str]:
    """Gate executes in a loop while the server is killed and restarted; the ids seen executed."""
    kw.policies.add(Policy(name="ok", action="read", effect=Effect.ALLOW))
    gater = gating(kw)
    thread = threading.Thread(target=gater.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(gater.calls) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()
        time.sleep(0.3)
        server.restart()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(c.error is None for c in gater.calls[-20:]):
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        gater.stop.set()
        thread.join(10)
    errors = [c.error for c in gater.calls if c.error is not None]
    assert errors, "the kill went unnoticed"
    assert all(isinstance(e, StoreUnavailableError) for e in errors), errors[:5]
    assert gater.calls[-1].error is None, "the engine did not recover after the restart"
    return [c.result.audit_event_id for c in gater.calls if c.error is None]


def _audited(kw: Klockwork, kind: str) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = kw.audit.query(kind=kind, cursor=cursor, limit=1000)
        ids += [e.data["audit_event_id"] for e in page.entries]
        cursor = page.next_cursor
        if cursor is None:
            return ids


def test_a_server_killed_mid_audit_append_leaves_no_silent_gap(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """SIGKILL while gates execute in a loop; restart from the AOF.

    Proves, for the engine that made the decisions: ``verify`` is valid
    over a gapless chain, and every gate the caller saw executed has
    exactly one ``action.executed`` entry. (That no entry exists for a gate
    that failed is the next test's: under a random kill it shows only now
    and then.)
    """
    kw = engines(server.url(NS))
    seen = _killed_mid_gates(server, kw)
    result = kw.audit.verify()
    assert result.valid, result.reason
    assert result.checked == result.head_seq  # seq 1..head, nothing skipped
    counts = Counter(_audited(kw, "action.executed"))
    assert [i for i in seen if counts[i] != 1] == []


def test_a_gate_whose_write_never_reached_redis_leaves_no_audit_entry(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """The server dies between a gate record's lock and its compare-and-set write.

    Proves (once it passes): the gate raises StoreUnavailableError, nothing
    is stored on Redis, and the audit trail has no entry for it (no phantom
    ``action.executed`` for an action that was never allowed to run).
    """
    kw = engines(server.url(NS))
    kw.policies.add(Policy(name="ok", action="read", effect=Effect.ALLOW))
    store: Any = kw.store
    real = store._call

    def dies_before_the_write(source: str, *args: Any, **kwargs: Any) -> Any:
        if source == scripts.RECORD_CAS:
            server.kill()  # after the transition ran, before its write reaches Redis
        return real(source, *args, **kwargs)

    store._call = dies_before_the_write
    try:
        with pytest.raises(StoreUnavailableError):
            kw.gates.execute("a", "read", {}, event_id="never-written")
    finally:
        del store._call
    server.restart()
    assert kw.store.list_records("gate", GateRecord) == []  # nothing committed
    assert [(e.kind, e.data.get("event_id")) for e in kw.audit.query().entries] == []


def test_audit_entries_survive_a_server_crash_for_every_engine(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """After a kill mid-append and a restart, a newly opened engine verifies the whole chain.

    Proves (once it passes): the audit trail is durable on Redis with the
    decisions, one chain for every machine, with an entry for every gate a
    caller saw executed.
    """
    url = server.url(NS)
    seen = _killed_mid_gates(server, engines(url))
    later = engines(url)
    result = later.audit.verify()
    assert result.valid, result.reason
    assert set(seen) <= set(_audited(later, "action.executed"))


# -- the bus ---------------------------------------------------------------------------------
def test_an_acked_message_is_not_redelivered_nor_a_published_one_lost_across_a_crash(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """SIGKILL while a producer publishes and a consumer takes and acks; restart from the AOF.

    Proves at-least-once across a crash: every publish that returned is
    delivered; a delivery whose ack failed is redelivered, or its ack had
    in fact committed (acking it again finds nothing pending) — never left
    pending without redelivery; no delivery of a message arrives after an
    ack of it returned (an acked message is never redelivered); every
    failure while down is StoreUnavailableError.
    """
    url = server.url(NS)
    producer_kw, consumer_kw = engines(url), engines(url)
    consumer_kw.bus.create_group("jobs", "g", visibility_timeout_s=1, max_deliveries=1000)
    published: list[str] = []
    delivered: set[str] = set()
    acked_at: dict[str, float] = {}
    late: list[str] = []  # deliveries of a message after its ack returned
    errors: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            call = timed(partial(producer_kw.bus.publish, "jobs", {"n": n}))
            if call.error is None:
                published.append(call.result.id)
                n += 1
            else:
                errors.append(call.error)
                time.sleep(0.01)
            time.sleep(0.002)

    def consume() -> None:
        while not stop.is_set():
            got = timed(lambda: consumer_kw.bus.subscribe("jobs", "g", "c", 20, wait_s=0.2))
            if got.error is not None:
                errors.append(got.error)
                time.sleep(0.01)
                continue
            delivered.update(d.message.id for d in got.result)
            late.extend(d.message.id for d in got.result if d.message.id in acked_at)
            done = timed(partial(consumer_kw.bus.ack, "jobs", "g", got.result))
            if done.error is not None:
                errors.append(done.error)
                continue
            for d in got.result:
                acked_at.setdefault(d.message.id, done.ended)

    threads = [threading.Thread(target=t, daemon=True) for t in (produce, consume)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while len(acked_at) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()
        time.sleep(0.4)
        server.restart()
        # Everything published is delivered (unacked deliveries come back after 1 s).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            len(published) >= 400 and set(published) <= delivered
        ):
            time.sleep(0.05)
        time.sleep(3.5)  # three visibility timeouts: redeliveries and wrong ones show by now
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors, "the kill went unnoticed"
    assert all(isinstance(e, StoreUnavailableError) for e in errors), [
        repr(e) for e in errors if not isinstance(e, StoreUnavailableError)
    ][:5]
    lost = set(published) - delivered
    assert not lost, f"{len(lost)} published messages were never delivered: {sorted(lost)[:10]}"
    # A delivery whose ack raised may have been acked all the same (the reply was lost):
    # acking again finds it not pending. One still pending was never redelivered.
    unacked = sorted(delivered - set(acked_at))
    stuck = consumer_kw.bus.ack("jobs", "g", unacked) if unacked else 0
    assert stuck == 0, f"of {unacked}, {stuck} stayed pending without redelivery"
    assert not late, f"acked messages delivered again: {late[:10]}"


def test_a_subscriber_blocked_when_the_server_dies_is_told_promptly(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """A consumer long-polling an empty channel when the server is SIGKILLed.

    Proves (once it passes): the blocked ``subscribe`` raises
    StoreUnavailableError within the socket timeout of the kill, instead of
    hanging until its own wait runs out (a long ``wait_s`` would hide an
    outage for that long).
    """
    kw = engines(server.url(NS))
    kw.bus.create_group("idle", "g")
    box: list[Call] = []
    thread = threading.Thread(
        target=lambda: box.append(timed(lambda: kw.bus.subscribe("idle", "g", "c", wait_s=20))),
        daemon=True,
    )
    thread.start()
    time.sleep(0.5)  # blocked, with the wake-up listener subscribed
    server.kill()
    killed_at = time.monotonic()
    thread.join(SOCKET_TIMEOUT_S + SLACK_S)
    try:
        assert box, f"subscribe still blocked {time.monotonic() - killed_at:.1f}s after the kill"
        assert isinstance(box[0].error, StoreUnavailableError), box[0]
    finally:
        kw.close()  # wakes the waiter (StoreUnavailableError) if it still sleeps
        thread.join(5)


def test_a_subscriber_blocked_while_the_server_restarts_resumes(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """A consumer long-polling across a kill and a quick restart (AOF).

    Proves: the blocked ``subscribe`` either fails closed or, once the
    server is back, receives a message published after the restart — it
    neither hangs past its wait nor raises an untyped error.
    """
    url = server.url(NS)
    kw, publisher = engines(url), engines(url)
    kw.bus.create_group("wake", "g")
    box: list[Call] = []
    thread = threading.Thread(
        target=lambda: box.append(timed(lambda: kw.bus.subscribe("wake", "g", "c", wait_s=5))),
        daemon=True,
    )
    thread.start()
    time.sleep(0.5)
    server.kill()
    time.sleep(0.3)
    server.restart()
    time.sleep(0.5)  # the listener resubscribes
    sent = publisher.bus.publish("wake", {"after": "restart"})
    thread.join(7)
    assert box, "subscribe hung past its wait"
    call = box[0]
    if call.error is not None:
        assert isinstance(call.error, StoreUnavailableError), repr(call.error)
        got = kw.bus.subscribe("wake", "g", "c", wait_s=2)  # the next call works
    else:
        got = call.result
    assert [d.message.id for d in got] == [sent.id]


def test_a_publish_after_a_restart_wakes_a_subscriber_blocked_across_it(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """A consumer long-polls across a kill, 0.5 s down and a restart; another engine publishes.

    Proves (once it passes): the wake-up subscription comes back with the
    server, so the blocked ``subscribe`` returns the message within 2 s of
    its publish, not when its own wait runs out.
    """
    url = server.url(NS)
    kw, publisher = engines(url), engines(url)
    kw.bus.create_group("wake", "g")
    box: list[Call] = []
    thread = threading.Thread(
        target=lambda: box.append(timed(lambda: kw.bus.subscribe("wake", "g", "c", wait_s=8))),
        daemon=True,
    )
    thread.start()
    time.sleep(0.5)
    server.kill()
    time.sleep(0.5)  # longer than the listener's pause before it subscribes again
    server.restart()
    time.sleep(0.5)
    sent = publisher.bus.publish("wake", {"after": "restart"})
    thread.join(2.0)
    try:
        assert box, "the publish did not wake the subscriber within 2 s"
        assert box[0].error is None and [d.message.id for d in box[0].result] == [sent.id]
    finally:
        kw.close()  # wakes the waiter if it still sleeps
        thread.join(5)


# -- read-only and volatile servers ------------------------------------------------------------
def _wait_replica_synced(client: redis.Redis, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.info("replication")
        if info.get("role") == "slave" and info.get("master_link_status") == "up":
            return
        time.sleep(0.05)
    raise AssertionError(f"the replica did not sync: {client.info('replication')}")


def _says_read_only(error: BaseException | None) -> bool:
    text = str(error).lower()
    return "readonly" in text or "read only" in text


def _writes(kw: Klockwork) -> dict[str, Callable[[], Any]]:
    """One write of each part of the engine."""
    return {
        "try_acquire": lambda: kw.leases.try_acquire("a", "s", ("FILE:/ro", "MUTATES")),
        "gate": lambda: kw.gates.execute("a", "ask", {}),
        "publish": lambda: kw.bus.publish("ro", {"n": 1}),
        "register_agent": lambda: kw.register_agent("ro-agent", priority=5),
    }


def test_a_read_only_replica_fails_closed(
    tmp_path: Path, engines: Callable[[str], Klockwork]
) -> None:
    """An engine opened on a replica, and one whose primary is demoted to a replica.

    Proves: every write (a lease, a gate that asks for approval, a publish,
    an agent) raises StoreUnavailableError saying the replica is read only;
    nothing is audited for them; nothing reaches the primary; and an engine whose
    server becomes a replica under it (a failover) fails closed the same way.
    """
    with (
        RedisServer(tmp_path / "primary", aof=True) as primary,
        RedisServer(
            tmp_path / "replica", aof=True, extra=["--replicaof", "127.0.0.1", str(primary.port)]
        ) as replica,
    ):
        replica_client = redis.Redis(port=replica.port)
        _wait_replica_synced(replica_client)
        kw = engines(replica.url(NS))
        kw.policies.add(Policy(name="ask", action="ask", effect=Effect.REQUIRE_APPROVAL))
        calls = {name: timed(fn) for name, fn in _writes(kw).items()}
        assert_failed_closed(list(calls.values()), bound_s=1.0)
        assert all(_says_read_only(c.error) for c in calls.values()), calls
        assert kw.audit.query().entries == []
        assert redis.Redis(port=primary.port).dbsize() == 0

        # Failover: the engine's server is demoted under it.
        demoted = engines(primary.url(NS))
        demoted.policies.add(Policy(name="ask", action="ask", effect=Effect.REQUIRE_APPROVAL))
        assert demoted.leases.try_acquire("x", "s", ("FILE:/before", "MUTATES")).granted
        demoted.audit.flush()  # sealed before the failover (a replica seals nothing)
        primary_client = redis.Redis(port=primary.port)
        replica_client.replicaof("NO", "ONE")
        primary_client.replicaof("127.0.0.1", replica.port)
        _wait_replica_synced(primary_client)
        calls = {name: timed(fn) for name, fn in _writes(demoted).items()}
        assert_failed_closed(list(calls.values()), bound_s=1.0)
        assert [e.kind for e in demoted.audit.query().entries] == ["lease.granted"]
        replica_client.close()
        primary_client.close()


def test_opening_a_server_without_persistence_warns(
    tmp_path: Path, engines: Callable[[str], Klockwork]
) -> None:
    """Proves: a Redis that would lose every lease, record and audit entry on
    restart is flagged at open with a warning naming persistence."""
    with (
        RedisServer(tmp_path / "volatile", aof=False) as volatile,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        engines(volatile.url(NS))
    texts = [str(w.message) for w in caught]
    assert any(
        word in text.lower() for text in texts for word in ("persist", "appendonly", "aof")
    ), texts


def test_opening_a_persistent_server_does_not_warn_about_persistence(
    server: RedisServer, engines: Callable[[str], Klockwork]
) -> None:
    """Proves: a server with AOF on opens without a persistence warning (no false alarm)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engines(server.url(NS))
    texts = [str(w.message).lower() for w in caught]
    assert not [t for t in texts if "persist" in t or "appendonly" in t or "aof" in t], texts
