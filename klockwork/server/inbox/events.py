"""The inbox's live stream: ``GET /inbox/events`` tells the page which sections changed.

A Server-Sent Events stream of ``changed`` events whose data is the list of
sections to fetch again (``{"sections": ["pending", "audit"]}``). The page
refetches those (``/inbox/partials/<section>``); it never learns anything
from the stream itself, so the stream needs no filtering per person.

What changed is found by comparing fingerprints of the store: pending
approvals, leases, and the audit head. They are read again

* at once when this process decides something (``kw.add_listener``), and
* every second otherwise, for what other processes on the same store did
  (an agent process asking for an approval, the CLI deciding one).

Reads run in a worker thread; the event loop only waits. Every open stream
of a server shares one reading (:class:`SharedFingerprint`): a hundred open
pages cost one read a second, not a hundred. The stream ends when the
client goes away (checked on every tick) or the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from klockwork.core.model import GovernanceEvent
from klockwork.server.inbox.base import Inbox

__all__ = ["Fingerprint", "SharedFingerprint", "add_events", "changed_sections", "fingerprint"]

POLL_S = 1.0
KEEPALIVE_S = 15.0


@dataclass(frozen=True)
class Fingerprint:
    """What the sections show, as digests: equal fingerprints, nothing to refetch."""

    pending: str
    leases: str
    audit_head: int


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def fingerprint(inbox: Inbox) -> Fingerprint:
    """The store's state as the inbox shows it (blocking: call it in a worker thread)."""
    kw = inbox.server.kw
    pending = [
        f"{a.approval_id}:{len(a.decisions)}:{a.deadline_ms}"
        for a in kw.approvals.list(status="pending")
    ]
    leases = [f"{lease.lease_id}:{lease.expires_at}" for lease in kw.leases.list()]
    # Who waits, not until when: a waiter in another process renews its place every moment.
    leases += [f"{w.agent_id}\n{w.session_id}\n{w.resource}" for w in kw.leases.waiters()]
    return Fingerprint(_digest(pending), _digest(leases), kw.audit.checkpoint().seq)


class SharedFingerprint:
    """The newest fingerprint, read at most once at a time for all the streams of a server."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox
        self._lock = threading.Lock()
        self._value: Fingerprint | None = None
        self._read_at = float("-inf")

    def newer_than(self, moment: float) -> Fingerprint:
        """A fingerprint read after ``moment`` (``time.monotonic()``); blocking.

        Streams asking at once wait for one reading and share it, instead of
        each reading the store.
        """
        with self._lock:
            if self._value is None or self._read_at < moment:
                read_at = time.monotonic()
                self._value, self._read_at = fingerprint(self._inbox), read_at
            return self._value


def changed_sections(before: Fingerprint | None, after: Fingerprint) -> list[str]:
    """The sections that show something new between two fingerprints."""
    if before is None:
        return []
    changed = []
    if before.pending != after.pending:
        changed.append("pending")
    if before.pending != after.pending or before.audit_head != after.audit_head:
        changed.append("history")  # a decision leaves pending, or an expiry is audited
    if before.leases != after.leases:
        changed.append("leases")
    if before.audit_head != after.audit_head:
        changed.append("audit")
    return changed


def _event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def add_events(api: APIRouter, inbox: Inbox) -> None:
    """Add ``GET /inbox/events`` to ``api``."""
    kw = inbox.server.kw
    shared = SharedFingerprint(inbox)

    @api.get("/inbox/events")
    async def events(request: Request) -> Response:
        """Tell the page, as it happens, which of its sections changed."""
        key = await run_in_threadpool(inbox.signed_in, request)
        if key is None:
            return Response("signed out", status_code=401, media_type="text/plain")
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def listener(event: GovernanceEvent) -> None:
            # Runs on the deciding thread: only hand the news to the loop, once
            # per wake (a burst of decisions is one refetch), and never fail
            # the decision if the loop has just closed.
            if not wake.is_set():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(wake.set)

        async def stream() -> AsyncIterator[bytes]:
            remove = kw.add_listener(listener)
            try:
                seen = await run_in_threadpool(shared.newer_than, time.monotonic())
                yield b"retry: 2000\n\n"
                yield _event("ready", {"sections": []})
                quiet = 0.0
                closing = inbox.server.closing
                while not await request.is_disconnected():
                    if closing.is_set():  # the server stops: end now, not at its deadline
                        yield _event("closing", {})
                        return
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=POLL_S)
                        fresh_after = time.monotonic()  # read after what woke us
                    except asyncio.TimeoutError:
                        quiet += POLL_S
                        fresh_after = time.monotonic() - POLL_S / 2
                    wake.clear()
                    if await run_in_threadpool(inbox.signed_in, _fresh(request)) is None:
                        yield _event("signed_out", {})
                        return
                    now = await run_in_threadpool(shared.newer_than, fresh_after)
                    sections = changed_sections(seen, now)
                    seen = now
                    if sections:
                        quiet = 0.0
                        yield _event("changed", {"sections": sections})
                    elif quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield b": keepalive\n\n"  # keeps proxies from closing an idle stream
            finally:
                remove()

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _fresh(request: Request) -> Request:
    """``request`` without the session resolved earlier, so its key is checked again."""
    request.scope.pop("inbox_key", None)
    return request
