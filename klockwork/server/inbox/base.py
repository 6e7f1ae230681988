"""What every part of the inbox shares: the server, its sessions, the rules, the renderer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from klockwork.core.errors import KlockworkError
from klockwork.server.context import Server
from klockwork.server.decisions import Decisions
from klockwork.server.errors import ApiError, engine_error
from klockwork.server.inbox.render import Renderer
from klockwork.server.inbox.session import Sessions
from klockwork.server.keys import ApiKey

__all__ = ["Inbox"]


@dataclass
class Inbox:
    """The inbox of one server."""

    server: Server
    sessions: Sessions = field(init=False)
    decisions: Decisions = field(init=False)
    renderer: Renderer = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = Sessions(self.server)
        self.decisions = Decisions(self.server)
        self.renderer = Renderer(self.sessions)

    def signed_in(self, request: Request) -> ApiKey | None:
        """The person signed in on ``request`` (None: nobody, or a session that ended)."""
        return self.sessions.key_of(request)

    def answer(
        self, request: Request, key: ApiKey | None, work: Callable[[], Response]
    ) -> Response:
        """``work()``'s response, or the page of its refusal (engine errors included)."""
        try:
            return work()
        except ApiError as exc:
            return self.renderer.error(request, exc, key)
        except KlockworkError as exc:
            return self.renderer.error(request, engine_error(exc), key)

    def to_signin(self, request: Request) -> Response:
        """Back to the sign-in page, dropping a cookie that no longer signs anyone in."""
        response = RedirectResponse("/", status_code=303)
        if request.cookies.get("kw_session"):
            self.sessions.clear(response)
        return response

    def page(self, request: Request, key: ApiKey, template: str, **context: Any) -> HTMLResponse:
        """A page for the signed-in ``key``."""
        return self.renderer.page(request, template, key, **context)
