"""``klockwork serve``: the HTTP API and the approvals inbox over one store (``server`` extra).

What it refuses, and why:

* a host other than loopback (``127.0.0.0/8``, ``::1``, ``localhost``)
  while the store has no active API key: anyone who can reach the port
  would meet a server nobody can sign in to, or, worse, one an operator
  "fixes" by weakening it. It checks before binding, and exits 2.
* running without FastAPI and uvicorn (exit 2, naming the extra).

On loopback, a store that never had a key gets one admin key (principal
``admin``), printed once on stderr, so that ``memory://`` and a first run
are usable at once (as Jupyter prints its token). A store that has keys,
even only revoked ones, gets none: whoever revoked them meant it, and
``klockwork keys create`` makes new ones.

The server binds its socket itself, before uvicorn starts: the address in
use is then a clean exit 3 with one line, and ``--port 0`` picks a free
port and prints it. Ctrl-C and SIGTERM stop it gracefully (open requests,
including live streams, get a few seconds) and close the engine; the exit
code is then 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from klockwork.cli.support import OK, UNAVAILABLE, USAGE, fail, is_loopback
from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError
from klockwork.server.keys import ApiKeys

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["add_parsers", "masked", "run"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
#: How long open requests (live streams never end) get to finish on a stop.
_GRACE_S = 5


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the top-level parser."""
    serve = commands.add_parser(
        "serve", help="run the HTTP API and the approvals inbox (needs klockwork[server])"
    )
    serve.add_argument(
        "--url",
        help="the store (default: $KLOCKWORK_URL): sqlite:///kw.db, redis://...; "
        "memory:// for a throwaway one",
    )
    serve.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"the address to listen on (default {DEFAULT_HOST}); "
        "anything but loopback needs an active API key in the store",
    )
    serve.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0: any free"
    )
    serve.add_argument("--policies", metavar="FILE", help="load policies from a YAML/JSON file")
    serve.add_argument(
        "--audit-key-env",
        metavar="VAR",
        help="environment variable holding the HMAC key that signs audit checkpoints",
    )
    serve.add_argument(
        "--secure-cookies",
        action="store_true",
        help="send the inbox's session cookie over HTTPS only (with TLS in front)",
    )
    serve.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        default="info",
        help="uvicorn's log level (default info: one line per request on stderr)",
    )


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0..65535")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``klockwork serve`` until Ctrl-C or SIGTERM; raises ``CliError`` for a failure."""
    try:  # first: nothing is opened or created for a server that cannot run
        import uvicorn

        from klockwork.server.app import create_app
        from klockwork.server.context import ServerSettings
    except ImportError as exc:
        fail(
            USAGE,
            f"klockwork serve needs the server extra ({exc.name or exc} is missing): "
            "pip install 'klockwork[server]'",
        )
    url = args.url or os.environ.get("KLOCKWORK_URL")
    if not url:
        fail(USAGE, "no store given: pass --url sqlite:///kw.db (or memory:// to try it out)")
    audit_key: str | None = None
    if args.audit_key_env:
        audit_key = os.environ.get(args.audit_key_env)
        if not audit_key:
            fail(USAGE, f"${args.audit_key_env} is not set")
    if not is_loopback(args.host) and _new_store(url):
        _refuse_public(args.host, url)  # without creating the store on the way
    kw = _open(url, audit_key)
    stop = _StopOnSignal()
    try:
        with stop:
            if args.policies:
                try:
                    kw.policies.load(args.policies)
                except InvalidRequestError as exc:
                    fail(USAGE, str(exc))
            public = not is_loopback(args.host)
            if public:
                _require_a_key(kw, args.host, url)  # before anything listens
            sock = _bind(args.host, args.port)
            address = _address(sock)
            print(
                f"klockwork: serving {masked(url)} at {address}/v1 "
                f"(schema: {address}/openapi.json)\n"
                f"klockwork: the approvals inbox: {address}/  (Ctrl-C stops the server)",
                flush=True,
            )
            if not public:
                _first_key(kw)  # after the bind: no key is made for a server that cannot run
            settings = ServerSettings(secure_cookies=args.secure_cookies)
            _serve(uvicorn, create_app(kw, settings), sock, args.log_level)
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        kw.close()  # waits for the audit trail's last entries to be sealed
    print("klockwork: stopped", file=sys.stderr)
    return OK


def _open(url: str, audit_key: str | None) -> Klockwork:
    try:
        return Klockwork.open(url, audit_key=audit_key)
    except InvalidRequestError as exc:
        fail(USAGE, str(exc))
    except StoreUnavailableError as exc:
        fail(UNAVAILABLE, str(exc))


def _require_a_key(kw: Klockwork, host: str, url: str) -> None:
    """Refuse a public bind while no key can sign in."""
    try:
        if ApiKeys(kw).any_active():
            return
    except StoreUnavailableError as exc:
        fail(UNAVAILABLE, str(exc))
    _refuse_public(host, url)


def _first_key(kw: Klockwork) -> None:
    """On a store that never had a key, make one admin key and print it once (stderr)."""
    keys = ApiKeys(kw)
    try:
        if keys.list(include_revoked=True):
            return
        _, secret = keys.create("admin", "admin", label="made by klockwork serve (first start)")
    except StoreUnavailableError as exc:
        fail(UNAVAILABLE, str(exc))
    print(
        "klockwork: this store had no API key, so an admin key (principal 'admin') was "
        "created. It is shown only this once:\n\n"
        f"    {secret}\n\n"
        "klockwork: sign in to the inbox with it, or send it as 'Authorization: Bearer KEY'; "
        "make keys for each person and agent with `klockwork keys create`.",
        file=sys.stderr,
        flush=True,
    )


def _new_store(url: str) -> bool:
    """True when ``url`` names a store that cannot hold a key yet (memory, no such file)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() == "memory":
        return True
    path = rest[1:] if scheme.lower() == "sqlite" and rest.startswith("/") else ""
    return bool(path) and path != ":memory:" and not os.path.exists(path)


def masked(url: str) -> str:
    """``url`` with its password, if any, as ``***``: what is printed goes to logs."""
    try:
        password = urlsplit(url).password
    except ValueError:  # a malformed URL: nothing to find in it
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def _refuse_public(host: str, url: str) -> NoReturn:
    fail(
        USAGE,
        f"refusing to listen on {host} (not loopback) with no active API key in {masked(url)}: "
        f"create one first with `klockwork keys create NAME --role approver --url {masked(url)}`",
    )


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (what uvicorn would make, made here first)."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        fail(USAGE, f"cannot listen on {host}: {exc}")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        fail(UNAVAILABLE, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve(uvicorn: Any, app: FastAPI, sock: socket.socket, log_level: str) -> None:
    config = uvicorn.Config(
        app,
        log_level=log_level,
        # The rate limiter counts failed sign-ins per socket peer (see
        # klockwork.server.auth): a forwarded header from any local process
        # must not pick the address it is counted under.
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=_GRACE_S,
    )
    closing = app.state.server.closing

    class Server(uvicorn.Server):  # type: ignore[misc]
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            closing.set()  # live streams end by themselves within a moment
            super().handle_exit(sig, frame)

    Server(config).run(sockets=[sock])


class _Stopped(Exception):
    """SIGTERM arrived: end like Ctrl-C does."""


class _StopOnSignal:
    """SIGTERM raises :class:`_Stopped` (in the main thread) while in the block.

    uvicorn stops gracefully on SIGTERM and then raises the signal again
    under the handler it found: with Python's default one, the process would
    die there, before the engine is closed. This handler turns that second
    delivery (or a SIGTERM before uvicorn starts) into an exception that
    ``run`` catches, so the engine is closed and the exit code is 0.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self._active:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        raise _Stopped(signum)
