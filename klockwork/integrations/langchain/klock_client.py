"""Leasing through a client of Klock itself, with Klock's own semantics.

``klock-langchain``'s ``@klock_protected(klock_client, ...)`` works with any
object that has Klock's client methods — Klock's PyO3 client, its HTTP
client, a test double. So does ours: such a client is driven the way
``klock-langchain`` drives it, so a user switches by changing an import:

* ``acquire_lease(agent_id, session_id, resource_type, resource_path,
  predicate, ttl_ms)`` returns ``{"success": True, "lease_id": ...}`` or
  ``{"success": False, "reason": "WAIT" | "DIE", "wait_time": ms | None}``;
* **WAIT** sleeps ``wait_time or 1000`` ms and tries again; **DIE** backs
  off (50 ms doubling to 1 s, with jitter) and tries again — wait-die says
  the younger request restarts, keeping its age; Klock's own decorator
  gave up at once. Both count against ``max_retries`` (``max_retries=0``
  tries once). When they run out: :class:`~klockwork.LeaseTimeoutError`
  (the guard reports it as ``KlockConflictError`` reason ``WAIT_TIMEOUT``
  or ``DIE``); any other reason is refused at once
  (:class:`~klockwork.LeaseConflictError` with that reason);
* several paths (an extractor returning a list) are taken one by one in
  sorted order; a refusal gives back what was taken before waiting, so two
  callers never hold parts of each other's manifests;
* ``release_lease(lease_id)`` in ``finally``; ``heartbeat_lease(lease_id)``,
  if the client has it, every ttl/3 while the tool runs.

The async twin runs the client's (blocking) calls in worker threads and
sleeps with ``asyncio.sleep``: the event loop never waits on Klock.
klockwork's own engine takes a better path (release notifications instead
of sleeping, reservations, fencing): pass a :class:`klockwork.KlockClient`
or a :class:`klockwork.Klockwork` to get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from tenacity import RetryCallState, wait_exponential, wait_random

from klockwork.core.errors import InvalidRequestError, LeaseConflictError, LeaseTimeoutError
from klockwork.core.model import Predicate

__all__ = ["KlockClientLeases", "is_klock_client"]

_log = logging.getLogger("klockwork")
#: Klock's sleep when a WAIT names no time.
KLOCK_DEFAULT_WAIT_MS = 1000


def is_klock_client(obj: object) -> bool:
    """True for an object with Klock's ``acquire_lease`` and ``release_lease`` methods."""
    return callable(getattr(obj, "acquire_lease", None)) and callable(
        getattr(obj, "release_lease", None)
    )


class _Call(NamedTuple):
    method: Callable[..., Any]
    args: tuple[Any, ...]
    acquires: bool


class _Sleep(NamedTuple):
    seconds: float


_Step = _Call | _Sleep


class KlockClientLeases:
    """Holds a call's leases through a Klock client (see the module docstring)."""

    def __init__(self, client: object, max_retries: int) -> None:
        if not is_klock_client(client):
            raise InvalidRequestError(
                "klock_client",
                client,
                "expected a klockwork KlockClient or Klockwork, or a Klock client "
                "with acquire_lease() and release_lease() methods",
            )
        self.client = client
        self.max_retries = max_retries
        beat = getattr(client, "heartbeat_lease", None)
        self._heartbeat: Callable[[str], Any] | None = beat if callable(beat) else None

    # -- the decisions, written once ------------------------------------------------
    def _flow(
        self, agent_id: str, session_id: str, intents: Sequence[tuple[str, Predicate]], ttl_ms: int
    ) -> Generator[_Step, Any, list[str]]:
        acquire = getattr(self.client, "acquire_lease")  # noqa: B009  (checked, not typed)
        release = getattr(self.client, "release_lease")  # noqa: B009
        backoff = wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05)
        retry_state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        retries = 0
        ordered = sorted(intents)
        while True:
            held: list[str] = []
            refusal: Mapping[str, Any] | None = None
            for key, predicate in ordered:
                rtype, _, path = key.partition(":")
                args = (agent_id, session_id, rtype, path, predicate.value, ttl_ms)
                result = yield _Call(acquire, args, True)
                if not isinstance(result, Mapping) or "success" not in result:
                    for lease_id in held:
                        yield _Call(release, (lease_id,), False)
                    raise InvalidRequestError(
                        "klock_client",
                        self.client,
                        f"acquire_lease returned {result!r}; expected a dict with 'success'",
                    )
                if result["success"]:
                    held.append(str(result.get("lease_id")))
                    continue
                refusal = result
                break
            if refusal is None:
                return held
            # Wait-die: never hold part of a manifest while waiting for the rest.
            for lease_id in held:
                yield _Call(release, (lease_id,), False)
            reason = str(refusal.get("reason") or "CONFLICT")
            wait_time = refusal.get("wait_time")
            wait_ms = wait_time if isinstance(wait_time, int) else None
            if reason not in ("WAIT", "DIE"):
                raise LeaseConflictError(reason, (), wait_ms)
            if retries >= self.max_retries:
                raise LeaseTimeoutError(reason, (), wait_ms)
            retries += 1
            if reason == "WAIT":
                yield _Sleep((wait_ms or KLOCK_DEFAULT_WAIT_MS) / 1000)
            else:
                retry_state.attempt_number = retries
                yield _Sleep(backoff(retry_state))

    # -- drivers: only I/O and sleeping -------------------------------------------
    @contextlib.contextmanager
    def hold(
        self, agent_id: str, session_id: str, intents: Sequence[tuple[str, Predicate]], ttl_ms: int
    ) -> Iterator[list[str]]:
        """Hold the leases for the ``with`` block; released (and heartbeats stopped) on exit."""
        flow = self._flow(agent_id, session_id, intents, ttl_ms)
        try:
            step = next(flow)
            while True:
                if isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                else:
                    step = flow.send(step.method(*step.args))
        except StopIteration as done:
            lease_ids: list[str] = done.value
        with self._held(lease_ids, ttl_ms):
            yield lease_ids

    @contextlib.asynccontextmanager
    async def ahold(
        self, agent_id: str, session_id: str, intents: Sequence[tuple[str, Predicate]], ttl_ms: int
    ) -> AsyncIterator[list[str]]:
        """Async twin of :meth:`hold`: the client's calls run in worker threads."""
        flow = self._flow(agent_id, session_id, intents, ttl_ms)
        taken: list[str] = []  # granted by calls whose caller may be cancelled
        try:
            step = next(flow)
            while True:
                if isinstance(step, _Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                else:
                    result = await self._call_in_thread(step, taken)
                    step = flow.send(result)
        except StopIteration as done:
            lease_ids: list[str] = done.value
        except asyncio.CancelledError:
            await asyncio.to_thread(self._release_all, taken)
            raise
        try:
            # Released in a worker thread too: release_lease blocks.
            with self._held(lease_ids, ttl_ms, release=False):
                yield lease_ids
        finally:
            await asyncio.to_thread(self._release_all, lease_ids)

    async def _call_in_thread(self, step: _Call, taken: list[str]) -> Any:
        task = asyncio.ensure_future(asyncio.to_thread(step.method, *step.args))
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The call goes on in its thread: a lease it grants after the
            # cancellation is given back, not left held until its TTL.
            if step.acquires:
                task.add_done_callback(self._give_back_late_grant)
            raise
        if step.acquires and isinstance(result, Mapping) and result.get("success"):
            taken.append(str(result.get("lease_id")))
        elif not step.acquires and step.args and step.args[0] in taken:
            taken.remove(step.args[0])
        return result

    def _give_back_late_grant(self, task: asyncio.Future[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        if isinstance(result, Mapping) and result.get("success"):
            lease_id = str(result.get("lease_id"))
            threading.Thread(target=self._release_all, args=([lease_id],), daemon=True).start()

    # -- while held ---------------------------------------------------------------
    @contextlib.contextmanager
    def _held(self, lease_ids: list[str], ttl_ms: int, *, release: bool = True) -> Iterator[None]:
        beat = None
        if self._heartbeat is not None and lease_ids:
            beat = _Heartbeat(self._heartbeat, lease_ids, ttl_ms / 3000)
            beat.start()
        try:
            yield
        finally:
            if beat is not None:
                beat.stop()
            if release:
                self._release_all(lease_ids)

    def _release_all(self, lease_ids: Sequence[str]) -> None:
        release = getattr(self.client, "release_lease")  # noqa: B009
        for lease_id in list(lease_ids):
            try:
                release(lease_id)
            except Exception:
                # The tool already ran (or failed): its outcome is what the
                # caller needs; the lease ends at its TTL anyway.
                _log.warning(
                    "klockwork: Klock client failed to release %s", lease_id, exc_info=True
                )


class _Heartbeat:
    """Renews leases through ``heartbeat_lease`` every ``interval_s`` until stopped."""

    def __init__(self, beat: Callable[[str], Any], lease_ids: list[str], interval_s: float) -> None:
        self._beat = beat
        self._lease_ids = lease_ids
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="klock-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            for lease_id in self._lease_ids:
                try:
                    renewed = self._beat(lease_id)
                except Exception:
                    renewed = False
                if renewed is False:
                    _log.warning("klockwork: Klock lease %s could not be renewed", lease_id)
