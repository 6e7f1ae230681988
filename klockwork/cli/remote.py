"""``--server URL``: ask a running ``klockwork serve`` instead of opening the store.

``klockwork approvals``, ``klockwork leases`` and ``klockwork audit tail``
take ``--server URL`` (or ``$KLOCKWORK_SERVER``) with ``--api-key KEY`` (or,
better, since a command line is visible to other users of the machine,
``$KLOCKWORK_API_KEY``) as an alternative to a store URL. The command then
calls the HTTP API and prints the same as it would from the store.

Which one: an explicit ``--server`` or ``--url`` decides (both is a usage
error); with neither, ``$KLOCKWORK_SERVER`` wins over ``$KLOCKWORK_URL``
(it only ever means the command line).

The API's refusals map to the exit codes of :mod:`klockwork.cli`: 401, 403,
409, 410 and 429 are "refused" (1); 404, 422 and other 4xx are bad input
(2); 5xx, an answer that is not the API's, and a server that does not answer
are 3. Only the standard library is used: the command line needs no HTTP
package.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from email.message import Message
from typing import Any, NoReturn

from klockwork.cli.support import INVALID, UNAVAILABLE, USAGE, fail, is_loopback

__all__ = ["Remote", "add_server_options", "remote_for"]

#: Refusals a retry with the same request will not change (exit 1).
_REFUSED = frozenset({401, 403, 409, 410, 429})
_TIMEOUT_S = 30.0


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--server`` and ``--api-key`` to a subcommand."""
    parser.add_argument(
        "--server",
        metavar="URL",
        help="ask a running `klockwork serve` (http://HOST:PORT) instead of a store "
        "(default: $KLOCKWORK_SERVER)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="the key to sign in with at --server (default: $KLOCKWORK_API_KEY, "
        "which other users cannot see in the process list)",
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would send the Authorization header on to wherever a redirect
    # points, another host included: the key stays with the server it was
    # given for, and a redirect is reported instead.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Remote:
    """The HTTP API of one ``klockwork serve``, signed in with one key."""

    def __init__(self, server: str, api_key: str, timeout_s: float = _TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            fail(USAGE, f"--server takes http://HOST:PORT or https://..., not {server!r}")
        self.server = server.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if is_loopback(parts.hostname):  # never hand a loopback request to $http_proxy
            handlers.append(urllib.request.ProxyHandler({}))
        elif parts.scheme == "http":
            print(
                f"klockwork: warning: the API key travels in clear text to {parts.hostname}; "
                "put TLS in front of the server and use https://",
                file=sys.stderr,
            )
        self._opener = urllib.request.build_opener(*handlers)

    def get(self, path: str, **query: Any) -> Any:
        """``GET`` an API path (``/v1/...``); None query values are left out."""
        params = {k: v for k, v in query.items() if v is not None}
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        return self._call("GET", path, None)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        """``POST`` a JSON body to an API path."""
        return self._call("POST", path, json.dumps(body).encode())

    def _call(self, method: str, path: str, data: bytes | None) -> Any:
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._api_key}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        where = f"{method} {self.server}{path.split('?', 1)[0]}"
        try:
            with self._opener.open(request, timeout=self._timeout_s) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            with exc:
                _refusal(where, exc.code, exc.headers, exc.read())
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # Refused, reset, timed out, no such host, or not speaking HTTP.
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            fail(UNAVAILABLE, f"the server did not answer ({where}): {reason}")
        try:
            return json.loads(raw)
        except ValueError:
            fail(UNAVAILABLE, f"{where} answered something that is not JSON: is it klockwork?")


def _refusal(where: str, status: int, headers: Message, raw: bytes) -> NoReturn:
    """Fail with the exit code and message an error answer stands for."""
    argument = None
    try:
        detail = json.loads(raw)["error"]
        kind, message = str(detail["type"]), str(detail["message"])
        argument = detail.get("argument")
    except (ValueError, KeyError, TypeError, AttributeError):
        kind, message = "http", raw[:200].decode("utf-8", "replace").strip() or "no detail"
    if 300 <= status < 400:
        target = headers.get("Location", "elsewhere")
        fail(USAGE, f"{where} redirects to {target}: pass that address as --server")
    # A vote against the approver's own earlier vote is well-formed but refused
    # (as the store-backed command says, 1 not 2).
    if status in _REFUSED or (status == 422 and argument == "verdict"):
        fail(INVALID, f"refused ({status} {kind}): {message}")
    if status == 404 and kind == "not_found":  # no such route: not the API we know
        fail(USAGE, f"{where}: not found (is --server a klockwork server, of this version?)")
    if status < 500:
        fail(USAGE, message)
    fail(UNAVAILABLE, f"the server could not answer ({status} {kind}): {message}")


def remote_for(args: argparse.Namespace) -> Remote | None:
    """The server a command asks, or None when it opens the store (see the module docstring).

    Raises:
        CliError: USAGE for ``--server`` with ``--url``, or a server without a key.
    """
    server: str | None = args.server
    if server is not None and args.url is not None:
        fail(USAGE, "pass --server (ask a running server) or --url (open the store), not both")
    if server is None and args.url is None:
        server = os.environ.get("KLOCKWORK_SERVER") or None
    if server is None:
        return None
    api_key = args.api_key or os.environ.get("KLOCKWORK_API_KEY")
    if not api_key:
        fail(
            USAGE,
            f"{server} needs an API key: set $KLOCKWORK_API_KEY (or pass --api-key); "
            "create one with `klockwork keys create NAME --role approver`",
        )
    return Remote(server, api_key.strip())
