"""Inbox sessions: a signed cookie standing for an approver's key, and CSRF tokens.

Sign-in takes an API key once; the browser then carries a cookie, never the
key. The cookie holds ``<key id>.<expiry ms>.<nonce>`` and an HMAC-SHA256
of it under the server's secret, so it cannot be forged or extended, and
it is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's
request carries it) and ``Secure`` when the server says so.

Every request checks the cookie again against the store: a key revoked
since sign-in (or one that lost its approver role) signs its session out
at once, in every server process on the store. Signing out forgets the
cookie's nonce in this process too, so a copy of the cookie stops working.

Every form POST carries a CSRF token: the HMAC of the session's payload.
Sign-in itself is protected the same way by a short-lived pre-session
nonce cookie (so another site cannot sign a browser in as someone else).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
from typing import Any

from fastapi import Request, Response

from klockwork.server.context import Server
from klockwork.server.errors import ApiError
from klockwork.server.keys import ApiKey

__all__ = ["NOTICE_COOKIE", "SESSION_COOKIE", "SIGNIN_COOKIE", "Sessions"]

SESSION_COOKIE = "kw_session"
SIGNIN_COOKIE = "kw_signin"
NOTICE_COOKIE = "kw_notice"
#: Roles that may sign in: agents use the API with their key, never the inbox.
PEOPLE = ("approver", "admin")
_SIGNIN_TTL_S = 3600
_NOTICE_TTL_S = 120


class Sessions:
    """Issue, check and end the inbox's cookie sessions of one server."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._secret = server.secret
        self._ttl_ms = int(server.settings.session_ttl_s * 1000)
        self._secure = server.settings.secure_cookies
        #: Nonces of sessions signed out here, with their expiry (pruned as they lapse).
        self._ended: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- signing -------------------------------------------------------------------------
    def _mac(self, purpose: str, payload: str) -> str:
        message = f"{purpose}:{payload}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _now_ms(self) -> int:
        return self._server.kw.clock.now_ms()

    def _payload(self, request: Request) -> str | None:
        """The verified, unexpired, not signed-out payload of the request's cookie."""
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie or len(cookie) > 512:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", payload).encode()):
            return None
        parts = payload.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        expires_ms = int(parts[1])
        if expires_ms <= self._now_ms():
            return None
        with self._lock:
            if parts[2] in self._ended:
                return None
        return payload

    # -- sessions ------------------------------------------------------------------------
    def key_of(self, request: Request) -> ApiKey | None:
        """The active person's key the request's session stands for, or None.

        Resolved once per request. A revoked key, or one that is no longer an
        approver's or admin's, signs the session out.
        """
        if "inbox_key" in request.scope:
            cached: ApiKey | None = request.scope["inbox_key"]
            return cached
        key = None
        payload = self._payload(request)
        if payload is not None:
            found = self._server.keys.get(payload.split(".")[0])
            if found is not None and found.status == "active" and found.role in PEOPLE:
                key = found
        request.scope["inbox_key"] = key
        return key

    def start(self, response: Response, key: ApiKey) -> None:
        """Sign ``key`` in: set the session cookie on ``response``."""
        expires_ms = self._now_ms() + self._ttl_ms
        payload = f"{key.key_id}.{expires_ms}.{secrets.token_urlsafe(16)}"
        self._set(
            response,
            SESSION_COOKIE,
            f"{payload}.{self._mac('session', payload)}",
            self._ttl_ms // 1000,
        )
        response.delete_cookie(SIGNIN_COOKIE, path="/")

    def end(self, request: Request, response: Response) -> None:
        """Sign out: forget the cookie here and tell the browser to drop it."""
        payload = self._payload(request)
        if payload is not None:
            _, expires, nonce = payload.split(".")
            now = self._now_ms()
            with self._lock:
                self._ended = {n: e for n, e in self._ended.items() if e > now}
                self._ended[nonce] = int(expires)
        self.clear(response)

    def clear(self, response: Response) -> None:
        """Drop the session cookie (signed out, or a session that no longer holds)."""
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=self._secure, httponly=True, samesite="strict"
        )

    def _set(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self._secure,
            httponly=True,
            samesite="strict",
        )

    # -- CSRF ----------------------------------------------------------------------------
    def csrf_token(self, request: Request) -> str:
        """The token the session's forms carry ("" without a session)."""
        payload = self._payload(request)
        return "" if payload is None else self._mac("csrf", payload)

    def check_csrf(self, request: Request, token: str, key: ApiKey | None) -> None:
        """Refuse (403, audited) a POST whose token is not the session's."""
        expected = self.csrf_token(request)
        if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
            raise self.csrf_refusal(request, key)

    def csrf_refusal(self, request: Request, key: ApiKey | None) -> ApiError:
        """The audited 403 of a form without the right CSRF token."""
        return self._server.gatekeeper.refuse(
            request,
            403,
            "csrf",
            "this form is stale or did not come from the inbox: reload the page and try again",
            key,
        )

    def signin_nonce(self, request: Request) -> tuple[str, bool]:
        """The browser's pre-session nonce, and whether it is new (to be set as a cookie)."""
        nonce = request.cookies.get(SIGNIN_COOKIE)
        if nonce and len(nonce) <= 64:
            return nonce, False
        return secrets.token_urlsafe(16), True

    def signin_token(self, nonce: str) -> str:
        """The sign-in form's token for the pre-session ``nonce``."""
        return self._mac("signin", nonce)

    def remember_signin(self, response: Response, nonce: str) -> None:
        """Set the pre-session nonce cookie the sign-in form's token is bound to."""
        self._set(response, SIGNIN_COOKIE, nonce, _SIGNIN_TTL_S)

    def check_signin_token(self, request: Request, token: str) -> None:
        """Refuse (403, audited) a sign-in whose token does not match its nonce cookie."""
        nonce = request.cookies.get(SIGNIN_COOKIE)
        expected = self._mac("signin", nonce) if nonce and len(nonce) <= 64 else ""
        if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
            raise self.csrf_refusal(request, None)

    # -- notices (one message carried across a redirect) --------------------------------
    def notify(self, response: Response, level: str, text: str, **extra: Any) -> None:
        """Show ``text`` on the next page (``level``: ``ok`` or ``error``)."""
        body = json.dumps({"level": level, "text": text[:2000], **extra}, separators=(",", ":"))
        payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
        self._set(
            response, NOTICE_COOKIE, f"{payload}.{self._mac('notice', payload)}", _NOTICE_TTL_S
        )

    def notice(self, request: Request) -> dict[str, Any] | None:
        """The notice the previous answer left, if it is genuine."""
        cookie = request.cookies.get(NOTICE_COOKIE)
        if not cookie or len(cookie) > 4096:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("notice", payload).encode()):
            return None
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            found = json.loads(raw)
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    @staticmethod
    def clear_notice(response: Response) -> None:
        """Drop the notice once shown."""
        response.delete_cookie(NOTICE_COOKIE, path="/")
