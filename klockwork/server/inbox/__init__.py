"""The approvals inbox at ``/``: server-rendered pages for the people who decide.

An approver (or admin) signs in with their API key and gets a cookie
session; the inbox shows the pending approvals (who asked, the exact
action and arguments, the policy and conditions that held it, the
deadline), lets them approve, reject or edit as themselves, and shows the
history, the lease board and the audit tail with a verify button. Live
updates come over a small Server-Sent Events stream; without script every
page still works (forms post, pages reload).

Modules, by job:

* :mod:`.session`: the signed cookie, CSRF tokens, notices across redirects;
* :mod:`.render`: templates (autoescaped), filters, static files, headers;
* :mod:`.views`: what each section shows, read from the engine;
* :mod:`.pages`: the GET pages and partials;
* :mod:`.forms`: the POST forms (sign-in/out, decide, edit, verify);
* :mod:`.events`: the live stream.

Templates are in ``templates/``, the stylesheet and the script in
``static/``: no build step, nothing fetched from the internet.
"""

from __future__ import annotations

from fastapi import APIRouter

from klockwork.server.context import Server
from klockwork.server.inbox.base import Inbox
from klockwork.server.inbox.events import add_events
from klockwork.server.inbox.forms import add_forms
from klockwork.server.inbox.pages import add_pages

__all__ = ["Inbox", "router"]


def router(server: Server) -> APIRouter:
    """The inbox's pages and forms (not part of the OpenAPI schema).

    Also lets the API's GET routes accept an inbox session
    (``server.gatekeeper.session_key``), so the page's script can read them.
    """
    inbox = Inbox(server)
    server.gatekeeper.session_key = inbox.signed_in
    api = APIRouter(include_in_schema=False)
    add_pages(api, inbox)
    add_forms(api, inbox)
    add_events(api, inbox)
    return api
