"""The inbox's pages (GET): sign-in, pending approvals, history, leases, the audit tail.

Each page is one section in a common layout. The same section is also
served alone (``/inbox/partials/<section>``) for the script to swap in
when the live stream says something changed; without script, reloading
the page shows the same.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from klockwork.server.inbox.base import Inbox
from klockwork.server.inbox.session import SESSION_COOKIE
from klockwork.server.inbox.views import SECTIONS, Views

__all__ = ["add_pages", "signin_page"]

#: Page path -> (section, title).
PAGES = {
    "/": ("pending", "Pending approvals"),
    "/history": ("history", "Decided and expired"),
    "/leases": ("leases", "Lease board"),
    "/audit": ("audit", "Audit trail"),
}


def signin_page(inbox: Inbox, request: Request, status: int = 200, error: str = "") -> Response:
    """The sign-in form (with ``error`` when a sign-in was refused)."""
    sessions = inbox.sessions
    nonce, fresh = sessions.signin_nonce(request)
    response = inbox.renderer.page(
        request,
        "signin.html",
        None,
        status=status,
        title="Sign in",
        signin_csrf=sessions.signin_token(nonce),
        error=error,
    )
    if fresh:
        sessions.remember_signin(response, nonce)
    if request.cookies.get(SESSION_COOKIE):  # a session that no longer holds
        sessions.clear(response)
    return response


def add_pages(api: APIRouter, inbox: Inbox) -> None:
    """Add the pages, the partials and the static files to ``api``."""
    views = Views(inbox)
    renderer = inbox.renderer

    def show(request: Request, path: str) -> Response:
        key = inbox.signed_in(request)
        if key is None:
            return signin_page(inbox, request) if path == "/" else inbox.to_signin(request)
        section, title = PAGES[path]

        def work() -> Response:
            context = views.section(section, key)
            return inbox.page(
                request, key, "page.html", title=title, section=section, pages=PAGES, **context
            )

        return inbox.answer(request, key, work)

    # One handler per path (FastAPI routes by function), all showing their section.
    @api.get("/")
    def pending_page(request: Request) -> Response:
        """Pending approvals, or the sign-in form."""
        return show(request, "/")

    @api.get("/history")
    def history_page(request: Request) -> Response:
        """Decided and expired approvals."""
        return show(request, "/history")

    @api.get("/leases")
    def leases_page(request: Request) -> Response:
        """Who holds what, until when."""
        return show(request, "/leases")

    @api.get("/audit")
    def audit_page(request: Request) -> Response:
        """The newest audit entries, and a button to verify the chain."""
        return show(request, "/audit")

    @api.get("/signin")
    def signin_form(request: Request) -> Response:
        """The sign-in form lives at ``/`` (a bookmark of the form's target lands there)."""
        return RedirectResponse("/", status_code=303)

    @api.get("/inbox/partials/{section}")
    def partial(section: str, request: Request) -> Response:
        """One section alone, for the live update."""
        key = inbox.signed_in(request)
        if key is None:
            return Response("signed out", status_code=401, media_type="text/plain")
        if section not in SECTIONS:
            return Response("no such section", status_code=404, media_type="text/plain")

        def work() -> Response:
            context = views.section(section, key)
            return renderer.fragment(request, f"_{section}.html", key, **context)

        return inbox.answer(request, key, work)

    @api.get("/inbox/static/{name}")
    def static(name: str) -> Response:
        """The inbox's stylesheet and script."""
        return renderer.static(name)
