"""Turning the inbox's data into HTML: the templates, their filters, and the files served.

Templates are Jinja2 with autoescaping on for everything: an argument
like ``<script>`` is shown as text, never run. Pages are sent with a
Content-Security-Policy that allows the inbox's own script and style only
(no inline script, nothing from another origin), and are never cached.
The stylesheet and the script are files of this package (no build step,
nothing fetched from the internet), served with a version in their URL.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from klockwork.server.errors import ApiError
from klockwork.server.inbox.session import Sessions
from klockwork.server.keys import ApiKey

__all__ = ["Renderer", "STATIC_PREFIX"]

HERE = Path(__file__).parent
STATIC_PREFIX = "/inbox/static/"
_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
#: Sent with every page: only this origin's script, style and forms; never framed.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_SHORT_JSON = 160


def when(ms: int | None) -> str:
    """Epoch milliseconds as a UTC time people read ("" for None)."""
    if ms is None:
        return ""
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(ms: int | None) -> str:
    """Epoch milliseconds as ISO 8601 (for ``<time datetime=...>``)."""
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def pretty(value: Any) -> str:
    """JSON for a ``<pre>``: indented, keys in order, non-ASCII kept readable."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def compact(value: Any, limit: int = _SHORT_JSON) -> str:
    """One line of JSON, cut at ``limit`` characters."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def scalar(value: Any) -> str:
    """A plain value as people read it: text as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class Renderer:
    """Renders the inbox's pages and fragments, and serves its static files."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(when=when, iso=iso, pretty=pretty, compact=compact, scalar=scalar)
        self._static: dict[str, tuple[bytes, str]] = {}
        versions: dict[str, str] = {}
        for path in sorted((HERE / "static").iterdir()):
            if path.suffix in _TYPES:
                body = path.read_bytes()
                self._static[path.name] = (body, _TYPES[path.suffix])
                versions[path.name] = hashlib.sha256(body).hexdigest()[:12]
        # A file's URL changes with its content, so browsers may cache it for long.
        self.env.globals["static"] = lambda name: f"{STATIC_PREFIX}{name}?v={versions[name]}"

    def html(self, template: str, **context: Any) -> str:
        """``template`` rendered with ``context``."""
        return self.env.get_template(template).render(**context)

    def page(
        self,
        request: Request,
        template: str,
        key: ApiKey | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        """A whole page for ``key`` (None: signed out), with the notice left for it."""
        notice = self._sessions.notice(request)
        body = self.html(
            template,
            me=key,
            csrf=self._sessions.csrf_token(request) if key is not None else "",
            notice=notice,
            path=request.url.path,
            **context,
        )
        response = HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)
        if notice is not None:
            self._sessions.clear_notice(response)
        return response

    def fragment(
        self, request: Request, template: str, key: ApiKey, **context: Any
    ) -> HTMLResponse:
        """A part of a page the script swaps in on a live update."""
        body = self.html(template, me=key, csrf=self._sessions.csrf_token(request), **context)
        return HTMLResponse(body, headers=PAGE_HEADERS)

    def error(self, request: Request, error: ApiError, key: ApiKey | None) -> HTMLResponse:
        """The page of a refusal, with its status and what to do next."""
        response = self.page(
            request,
            "error.html",
            key,
            status=error.status,
            error=error.detail,
            status_code=error.status,
            title="Refused" if error.status < 500 else "Error",
        )
        response.headers.update(error.headers or {})
        return response

    def static(self, name: str) -> Response:
        """One of the package's static files; 404 for any other name."""
        found = self._static.get(name)
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        body, media_type = found
        headers = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
        return Response(body, media_type=media_type, headers=headers)
