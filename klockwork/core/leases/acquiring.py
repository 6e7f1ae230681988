"""The blocking acquire: one flow of decisions, driven by a sync and an async loop.

``kw.leases.acquire`` tries the store once itself (most requests are
granted at once, and then nothing here is built). When refused, an
:class:`AcquireFlow` decides what happens next — retry the store, wait for
a release, back off — as a generator that yields steps; :meth:`~AcquireFlow.block`
and :meth:`~AcquireFlow.ablock` only do the I/O and the waiting (httpx's
auth-flow shape), so the logic exists once.

Waiting is notification-driven: a WAIT arms an alarm on the keys of the
blocking holders (:mod:`klockwork.core.notify`), fired by the release,
expiry or revoke of those leases; the holder's TTL bounds the wait. On
stores shared by several processes, where a release may happen elsewhere,
the wait is also bounded by a short adaptive poll interval (1 ms doubling
to 50 ms), unless the store pushes those releases (Redis: Pub/Sub, see
``Store.lease_watch``). A DIE backs off (tenacity, exponential + jitter) keeping the
agent's priority. From its second try on, a blocked request holds a
*reservation*, so younger newcomers die instead of barging past it.

One call, one outcome: the refused tries along the way are not audited or
announced; the grant is (with the tries it took and the time it waited),
or the refusal once when the time runs out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, NamedTuple

from tenacity import RetryCallState, wait_exponential, wait_random

from klockwork.core.clock import Clock, in_running_loop
from klockwork.core.errors import EventLoopBlockedError, LeaseTimeoutError, StoreUnavailableError
from klockwork.core.model import Verdict, VerdictStatus
from klockwork.core.stores.base import AcquireOutcome, AcquireRequest

_log = logging.getLogger("klockwork")

if TYPE_CHECKING:
    from klockwork.core.leases.manager import LeaseManager

__all__ = ["AcquireFlow", "Tries", "busy_until_deadline"]

_POLL_MIN_S = 0.001
_POLL_MAX_S = 0.05
_GRANTED = VerdictStatus.GRANTED
_WAIT = VerdictStatus.WAIT


class _Try(NamedTuple):
    """Ask the store this request (it carries the reservation to record or clear)."""

    request: AcquireRequest


class _GiveUp(NamedTuple):
    """Record that the request gave up (its last verdict, tries and wait): store I/O."""

    verdict: Verdict
    tries: Tries


class _Wait(NamedTuple):
    """Sleep until one of ``keys`` is released (or ``timeout_s``), unless ``epoch`` passed."""

    keys: tuple[str, ...]
    epoch: int
    timeout_s: float | None


class Tries:
    """How many refused tries a blocking acquire made, and since when it waits."""

    __slots__ = ("count", "started")

    def __init__(self, clock: Clock) -> None:
        self.count = 0
        self.started = clock.monotonic()

    def waited_ms(self, clock: Clock) -> int:
        """Milliseconds since the first try."""
        return max(0, round((clock.monotonic() - self.started) * 1000))


class AcquireFlow:
    """One blocking acquire after a refused first try (see the module docstring)."""

    __slots__ = ("_manager", "_steps", "request", "reserved")

    def __init__(
        self,
        manager: LeaseManager,
        request: AcquireRequest,
        first: Verdict,
        timeout_s: float | None,
    ) -> None:
        self._manager = manager
        #: The request as last sent to the store.
        self.request = request
        #: True while the store holds a reservation the driver must remove
        #: if the caller stops waiting.
        self.reserved = False
        assert request.tries is not None, "a blocking acquire counts its tries"
        self._steps = self._decide(first, request.tries, timeout_s)

    def _decide(
        self, verdict: Verdict, tries: Tries, timeout_s: float | None
    ) -> Generator[_Try | _Wait | _GiveUp, AcquireOutcome | None, Verdict]:
        manager = self._manager
        clock, signals = manager._clock, manager._signals
        deadline = None if timeout_s is None else clock.monotonic() + timeout_s
        backoff = wait_exponential(multiplier=0.001, max=0.1) + wait_random(0, 0.002)
        retry_state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        poll_s = _POLL_MIN_S
        tries.count = 1
        epoch = -1  # the first try reserved nothing: retry at once
        while True:
            remaining = None if deadline is None else deadline - clock.monotonic()
            if remaining is not None and remaining <= 0:
                yield _GiveUp(verdict, tries)  # the driver audits it (off the event loop)
                raise LeaseTimeoutError(
                    verdict.status.value, verdict.conflicts, verdict.wait_time_ms
                )
            wait_s: float | None
            if verdict.status is _WAIT:
                retry_state.attempt_number = 1
                # Wake on a release notification, or once the holder's TTL is over.
                wait_s = None if verdict.wait_time_ms is None else verdict.wait_time_ms / 1000
                store = manager._store
                if store.cross_process and not store.lease_pushes_wakeups():
                    wait_s = poll_s if wait_s is None else min(wait_s, poll_s)
                    poll_s = min(poll_s * 2, _POLL_MAX_S)
            else:
                # DIE: back off, keeping our priority; a release of the blocking
                # lease wakes us early.
                wait_s = backoff(retry_state)
                retry_state.attempt_number += 1
            if remaining is not None:
                wait_s = remaining if wait_s is None else min(wait_s, remaining)
            # Wake on the end of a blocking lease, and also of the lease an older
            # waiter (a reservation) will take: its release frees us too. (With
            # epoch -1 the driver does not sleep: the first retry is at once.)
            yield _Wait(tuple({c.resource for c in verdict.conflicts}), epoch, wait_s)
            # Retry, reserving: a blocked request (WAIT or DIE alike) keeps
            # younger newcomers out, and its priority stays frozen meanwhile.
            epoch = signals.epoch
            self.request = self.request._replace(
                now_ms=clock.now_ms(),
                reserve_ms=manager._reserve_ms,
                clear_reservation=self.reserved,
            )
            self.reserved = True
            try:
                outcome = yield _Try(self.request)
            except StoreUnavailableError as exc:  # thrown in by the driver
                _raise_unless_past_deadline(self.request, exc)
                continue  # the store stayed busy past our deadline: time is up
            assert outcome is not None
            verdict = manager._verdict(self.request, outcome)
            if verdict.status is _GRANTED:
                self.reserved = False  # the grant replaced the reservation
                return verdict
            tries.count += 1

    # -- drivers: only I/O and waiting ------------------------------------------------
    def block(self) -> Verdict:
        """Drive the flow on this thread (``acquire``).

        Raises:
            LeaseTimeoutError: not granted in time.
            EventLoopBlockedError: it would wait on a running event loop's thread.
            StoreUnavailableError: the engine closed while waiting.
        """
        manager = self._manager
        steps = self._steps
        try:
            step = next(steps)
            while True:
                if type(step) is _Try:
                    try:
                        outcome = manager._store.try_acquire(step.request)
                    except StoreUnavailableError as exc:
                        step = steps.throw(exc)  # the flow decides what it means
                    else:
                        step = steps.send(outcome)
                    continue
                if type(step) is _GiveUp:
                    manager._gave_up(self.request, step.verdict, step.tries)
                    step = steps.send(None)
                    continue
                assert type(step) is _Wait
                if in_running_loop():
                    raise EventLoopBlockedError(
                        "kw.leases.acquire(...)", "await kw.leases.aacquire(...)"
                    )
                manager._signals.sleep(step.keys, step.epoch, step.timeout_s, manager._clock)
                manager._check_open()
                step = steps.send(None)
        except StopIteration as done:
            granted: Verdict = done.value
            return granted
        finally:
            if self.reserved:
                with _reservation_left_to_expire():
                    manager._store.unreserve(self.request.agent_id, self.request.session_id)

    async def ablock(self) -> Verdict:
        """Async twin of :meth:`block` (``aacquire``); cancelling withdraws the request."""
        manager = self._manager
        steps = self._steps
        try:
            step = next(steps)
            while True:
                if type(step) is _Try:
                    try:
                        outcome = await manager._atry(step.request)
                    except StoreUnavailableError as exc:
                        step = steps.throw(exc)  # the flow decides what it means
                    else:
                        step = steps.send(outcome)
                    continue
                if type(step) is _GiveUp:
                    await manager._store.run_io(
                        manager._gave_up, self.request, step.verdict, step.tries
                    )
                    step = steps.send(None)
                    continue
                assert type(step) is _Wait
                await manager._signals.asleep(step.keys, step.epoch, step.timeout_s, manager._clock)
                manager._check_open()
                step = steps.send(None)
        except StopIteration as done:
            granted: Verdict = done.value
            return granted
        finally:
            if self.reserved:
                with _reservation_left_to_expire():
                    await manager._store.aunreserve(self.request.agent_id, self.request.session_id)


def busy_until_deadline(request: AcquireRequest, error: StoreUnavailableError) -> Verdict:
    """The verdict of a *first* try the store could not decide before the caller's deadline.

    Another process held the store's write lock until after the caller's
    ``timeout_s`` ran out: like a refused retry (see
    :func:`_raise_unless_past_deadline`), that is a timeout, not an outage,
    so the flow gives up at once with a ``WAIT`` naming no holder (none is
    known). Before the deadline the error is the store's: re-raised.
    """
    _raise_unless_past_deadline(request, error)
    return Verdict(status=VerdictStatus.WAIT)


def _raise_unless_past_deadline(request: AcquireRequest, error: StoreUnavailableError) -> None:
    """Re-raise ``error`` unless a retry failed only because the caller's deadline passed.

    A blocked request that retries while another process holds the write
    lock past the caller's own deadline has simply run out of time: that is
    a ``LeaseTimeoutError`` (the flow raises it), not an outage.
    """
    deadline = request.deadline
    if deadline is None or time.monotonic() < deadline:
        raise error


@contextlib.contextmanager
def _reservation_left_to_expire() -> Iterator[None]:
    """Withdrawing a reservation is best effort: one the store cannot drop now expires."""
    try:
        yield
    except StoreUnavailableError as exc:
        _log.info("klockwork: reservation left to expire (%s)", exc)
