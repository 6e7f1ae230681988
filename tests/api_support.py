"""What the HTTP API tests share: one key of each role, and how to present a key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, NamedTuple

from klockwork.server.keys import ApiKeys

__all__ = ["CLI_VARIABLES", "Done", "HangingUpClient", "Here", "Keys", "bearer", "make_keys"]

#: The environment variables the ``klockwork`` command reads (cleared around CLI tests).
CLI_VARIABLES = ("KLOCKWORK_URL", "KLOCKWORK_SERVER", "KLOCKWORK_API_KEY", "KLOCKWORK_APPROVER")


class Done(NamedTuple):
    """What an in-process ``klockwork`` call printed and returned."""

    returncode: int
    stdout: str
    stderr: str


#: The ``here`` fixture: run ``klockwork ARGS`` in this process, with ``env`` set.
Here = Callable[..., Done]


class Keys(NamedTuple):
    """One key of each role (the secrets), and an agent with an owner."""

    admin: str
    approver: str
    other_approver: str
    agent: str  # principal "builder", owned by "alice"
    other_agent: str  # principal "reviewer"
    alice: str  # an approver who runs "builder"


def bearer(key: str) -> dict[str, str]:
    """The header that presents ``key``."""
    return {"Authorization": f"Bearer {key}"}


def make_keys(keys: ApiKeys) -> Keys:
    """The :class:`Keys` of the API tests, made in ``keys``' store."""
    return Keys(
        admin=keys.create("root", "admin")[1],
        approver=keys.create("bob", "approver")[1],
        other_approver=keys.create("carol", "approver")[1],
        agent=keys.create("builder", "agent", owner="alice")[1],
        other_agent=keys.create("reviewer", "agent")[1],
        alice=keys.create("alice", "approver")[1],
    )


class HangingUpClient:
    """One POST with a JSON body sent straight to an ASGI app by a client that hangs up.

    ``start()`` sends the request; the client stays connected until
    ``hang_up()``; ``done`` is the app's call, ``sent`` what it answered.
    (TestClient cannot disconnect in the middle of a request.)
    """

    def __init__(self, app: Any, path: str, body: dict[str, Any], key: str) -> None:
        self._app = app
        self._body = json.dumps(body).encode()
        self._path = path
        self._key = key
        self._left = asyncio.Event()
        self._incoming = [{"type": "http.request", "body": self._body, "more_body": False}]
        self.sent: list[dict[str, Any]] = []
        self.done: asyncio.Future[None] | None = None

    async def _receive(self) -> dict[str, Any]:
        if self._incoming:
            return self._incoming.pop()
        await self._left.wait()  # connected until it hangs up
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def start(self) -> asyncio.Future[None]:
        """Send the request; returns the app's call (a future)."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self._path,
            "raw_path": self._path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"authorization", f"Bearer {self._key}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(self._body)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8765),
        }
        self.done = asyncio.ensure_future(self._app(scope, self._receive, self._send))
        return self.done

    def hang_up(self) -> None:
        """The client goes away."""
        self._left.set()
