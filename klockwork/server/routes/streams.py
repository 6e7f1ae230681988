"""Live streams (Server-Sent Events): governance events, and audit entries as they are recorded.

Both are ``text/event-stream``; every event has ``id:`` (a seq to resume
from), ``event:`` (its kind) and ``data:`` (one line of JSON). A comment
(``: keepalive``) goes out after :data:`HEARTBEAT_S` of silence so proxies
keep the connection; the stream ends when the client goes away. A client
that reconnects sends ``Last-Event-ID`` (browsers do) and misses nothing
still kept; ``?after=SEQ`` does the same by hand. Without either, a stream
starts with what comes next.

* ``GET /v1/events/stream``: the engine's governance events (``lease.*``,
  ``action.*``, ``approval.*``, ...) as published on ``klockwork.events``;
  ``id`` is the message's seq there, ``data`` its payload ``{"kind", "ts",
  "agent_id", "session_id", "data"}``. The engine publishes them only while
  someone follows (docs/bus.md): an open stream follows with an in-process
  listener, which also wakes it at once; on a store shared by processes the
  server also creates the group :data:`FOLLOWER_GROUP` on the channel, so
  that the agent processes publish theirs (noticed within a second). That
  group is never read and stays, like any group, after the server stops.
* ``GET /v1/audit/stream``: audit entries (``data`` as ``GET /v1/audit``
  returns them, ``id`` their seq). A decision of this process wakes the
  stream at once (an engine listener: while one is open, each decision
  also builds its event); other processes' entries, and entries no event
  announces (``access.denied``, ``key.created``), are found by asking
  every :data:`POLL_S`.

The first line of a stream, ``retry: 3000``, is sent once the stream
follows: nothing that happens after it is missed. The loops ask the store
through worker threads (or the bus's async twins): the event loop only waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from klockwork.core.audit.chain import AUDIT_KINDS
from klockwork.core.audit.paging import encode_cursor
from klockwork.core.bus.model import EVENTS_CHANNEL
from klockwork.core.validation import INT64_MAX, MAX_KEY_CHARS
from klockwork.server.context import Server
from klockwork.server.errors import COMMON_REFUSALS, refusals
from klockwork.server.keys import ApiKey

__all__ = ["FOLLOWER_GROUP", "HEARTBEAT_S", "POLL_S", "Frame", "Wakeup", "router", "sse"]

#: Seconds of silence before a keepalive comment.
HEARTBEAT_S = 15.0
#: How often a stream asks for what other processes did (nothing wakes it for those).
POLL_S = 0.5
#: The group that makes agent processes on a shared store publish their governance events.
FOLLOWER_GROUP = "klockwork.serve"
#: What a stream reads at a time.
PAGE = 100
RETRY_MS = 3000
_KIND = re.compile(r"[a-z0-9_.:\-]{1,100}")  # what may stand on an ``event:`` line

_STREAM = {
    "description": "A Server-Sent Events stream (``id:``, ``event:``, ``data:`` JSON).",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Frame:
    """One event of a stream: its seq, its kind and its JSON data (one line)."""

    id: int
    event: str
    data: str

    def encode(self) -> bytes:
        """The event as it goes on the wire."""
        return f"id: {self.id}\nevent: {self.event}\ndata: {self.data}\n\n".encode()


#: Reads what follows a seq: (the seq read up to, the frames to send).
Read = Callable[[int], Awaitable[tuple[int, list[Frame]]]]


class Wakeup:
    """An event any thread may set (a listener's callback) and the event loop awaits."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def __call__(self, *_: object) -> None:
        """Wake the stream (called from whichever thread made the decision)."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to wake
            self._loop.call_soon_threadsafe(self._event.set)

    def clear(self) -> None:
        """Forget earlier wake-ups (before reading: what they announced is read now)."""
        self._event.clear()

    async def wait(self, timeout_s: float) -> None:
        """Until woken, or ``timeout_s`` have passed."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)


async def sse(
    read: Read,
    after: int,
    wake: Wakeup,
    alive: Callable[[], Awaitable[bool]],
    closing: threading.Event | None = None,
) -> AsyncGenerator[bytes, None]:
    """The stream of what ``read`` finds after ``after``, until cancelled or no longer ``alive``.

    Reads at once whenever the last read made progress; otherwise waits for
    a wake-up or :data:`POLL_S`, and sends a keepalive after
    :data:`HEARTBEAT_S` of silence. After each read it asks ``alive`` (is the
    key still active, the session still signed in?): once not, it sends a
    ``signed_out`` event and ends, so a revoked key receives nothing recorded
    after its revocation, as any other request of it is refused. When
    ``closing`` is set (the server is stopping) it sends ``closing`` and ends
    within :data:`POLL_S`, so a graceful stop does not wait for its deadline.
    """
    yield f"retry: {RETRY_MS}\n\n".encode()
    quiet_since = time.monotonic()
    while True:
        wake.clear()
        start = after
        after, frames = await read(after)
        # Asked after each read, before sending it: what a revoked key (or a
        # signed-out session) is sent was recorded before the revocation.
        if closing is not None and closing.is_set():
            yield b"event: closing\ndata: {}\n\n"
            return
        if not await alive():
            yield b"event: signed_out\ndata: {}\n\n"
            return
        if frames:
            yield b"".join(f.encode() for f in frames)
            quiet_since = time.monotonic()
        if after != start:
            continue
        silent = time.monotonic() - quiet_since
        if silent >= HEARTBEAT_S:
            yield b": keepalive\n\n"
            quiet_since, silent = time.monotonic(), 0.0
        await wake.wait(min(POLL_S, HEARTBEAT_S - silent))


def _event_frame(seq: int, payload: dict[str, object]) -> Frame:
    kind = payload.get("kind")
    event = kind if isinstance(kind, str) and _KIND.fullmatch(kind) else "message"
    return Frame(seq, event, json.dumps(payload, separators=(",", ":"), ensure_ascii=False))


def _response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=_HEADERS)


def router(server: Server) -> APIRouter:
    """``/v1/events/stream`` and ``/v1/audit/stream``."""
    api = APIRouter(
        prefix="/v1",
        tags=["streams"],
        responses=refusals(*COMMON_REFUSALS),
    )
    kw = server.kw
    watcher = Depends(server.gatekeeper.require("approver", "admin"))
    followed_by_group = False

    def resume_from(
        after: int | None = Query(
            default=None, ge=0, le=INT64_MAX, description="start after this seq"
        ),
        last_event_id: int | None = Header(
            default=None,
            ge=0,
            le=INT64_MAX,
            description="the last id seen (sent by a reconnecting client; wins over after)",
        ),
    ) -> int | None:
        return last_event_id if last_event_id is not None else after

    resume = Depends(resume_from)

    async def streamed(
        request: Request,
        key: ApiKey,
        read: Read,
        after: int,
        woken_by: Callable[[Wakeup], Callable[[], None]],
    ) -> AsyncIterator[bytes]:
        """The SSE body of ``read``, woken as ``woken_by`` arranges (it returns the undo)."""
        wake = Wakeup()
        stop_waking = woken_by(wake)
        try:
            stream = sse(read, after, wake, lambda: still_valid(request, key), server.closing)
            async with contextlib.aclosing(stream) as frames:
                async for chunk in frames:
                    yield chunk
        finally:
            stop_waking()

    async def still_valid(request: Request, key: ApiKey) -> bool:
        return await run_in_threadpool(server.gatekeeper.still_valid, request, key)

    async def follow_events() -> None:
        """On a store shared by processes, have every process publish its events."""
        nonlocal followed_by_group
        if kw.store.cross_process and not followed_by_group:
            await kw.bus.acreate_group(EVENTS_CHANNEL, FOLLOWER_GROUP, start="new")
            followed_by_group = True

    def events_head() -> int:
        found = (c.last_seq for c in kw.bus.channels() if c.channel == EVENTS_CHANNEL)
        return next(found, 0)

    @api.get("/events/stream", response_class=StreamingResponse, responses={200: _STREAM})
    async def events_stream(
        request: Request,
        key: ApiKey = watcher,
        start: int | None = resume,
        kind: str | None = Query(
            default=None,
            min_length=1,
            max_length=200,
            description="only kinds matching this glob (``approval.*``)",
        ),
    ) -> StreamingResponse:
        """Governance events as the engine publishes them on ``klockwork.events``."""
        await follow_events()
        after = start if start is not None else await run_in_threadpool(events_head)

        async def read(after: int) -> tuple[int, list[Frame]]:
            messages = await kw.bus.apeek(EVENTS_CHANNEL, after, PAGE)
            frames = [_event_frame(m.seq, m.payload) for m in messages]
            if kind is not None:
                frames = [f for f in frames if fnmatch.fnmatchcase(f.event, kind)]
            return (messages[-1].seq if messages else after), frames

        def woken_by(wake: Wakeup) -> Callable[[], None]:
            return kw.bus.on(EVENTS_CHANNEL, wake).cancel  # this process publishes, wakes us

        return _response(streamed(request, key, read, after, woken_by))

    @api.get("/audit/stream", response_class=StreamingResponse, responses={200: _STREAM})
    async def audit_stream(
        request: Request,
        key: ApiKey = watcher,
        start: int | None = resume,
        kind: str | None = Query(
            default=None,
            description="only entries of this kind",
            json_schema_extra={"enum": sorted(AUDIT_KINDS)},
        ),
        agent_id: str | None = Query(default=None, min_length=1, max_length=MAX_KEY_CHARS),
    ) -> StreamingResponse:
        """Audit entries as they are recorded (as ``GET /v1/audit`` shows them)."""
        # Checked now, not in the stream: a bad filter is a 422, not a broken stream.
        await run_in_threadpool(kw.audit.query, kind=kind, agent_id=agent_id, limit=1)
        if start is None:
            start = (await run_in_threadpool(kw.audit.checkpoint)).seq
        after = start

        async def read(after: int) -> tuple[int, list[Frame]]:
            page = await run_in_threadpool(
                kw.audit.query,
                kind=kind,
                agent_id=agent_id,
                cursor=encode_cursor(after),
                limit=PAGE,
            )
            frames = [Frame(e.seq, e.kind, e.model_dump_json()) for e in page.entries]
            return (frames[-1].id if frames else after), frames

        # This process's decisions wake us at once.
        return _response(streamed(request, key, read, after, kw.add_listener))

    return api
