"""The FastAPI application: the versioned API under ``/v1`` and the inbox at ``/``."""

from __future__ import annotations

from fastapi import FastAPI

from klockwork.core.engine import Klockwork
from klockwork.server import inbox
from klockwork.server.context import Server, ServerSettings
from klockwork.server.errors import install_handlers
from klockwork.server.routes import ROUTERS

__all__ = ["API_VERSION", "create_app"]

API_VERSION = "1"


def create_app(kw: Klockwork, settings: ServerSettings | None = None) -> FastAPI:
    """The HTTP API (and inbox) over ``kw``; serve it with any ASGI server.

    The engine is not closed by the app: whoever opened it closes it.
    Identity comes from API keys (:mod:`klockwork.server.keys`) in ``kw``'s store.
    """
    server = Server(kw, settings or ServerSettings())
    app = FastAPI(
        # FastAPI's /docs and /redoc pages load their scripts from a CDN: a
        # server that fetches nothing from the internet serves the schema only.
        docs_url=None,
        redoc_url=None,
        title="klockwork",
        version=API_VERSION,
        summary="Leases, gates, approvals, the audit trail and the bus over HTTP.",
        description=(
            "Every `/v1` request but `GET /v1/health` carries an API key "
            "(`Authorization: Bearer kw_...`); its identity comes from the key, "
            'never from the body. Errors are `{"error": {"type", "message", '
            '"argument"}}`.'
        ),
    )
    app.state.server = server
    install_handlers(app)
    for build in ROUTERS:
        app.include_router(build(server))
    app.include_router(inbox.router(server))
    return app
