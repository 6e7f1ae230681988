"""What the ``klockwork`` subcommands share: exit codes, opening a shared store, failing."""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any, NoReturn

from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError

__all__ = [
    "INVALID",
    "OK",
    "UNAVAILABLE",
    "USAGE",
    "CliError",
    "fail",
    "is_loopback",
    "open_shared",
]

#: Exit codes (see :mod:`klockwork.cli`).
OK, INVALID, USAGE, UNAVAILABLE = 0, 1, 2, 3


class CliError(Exception):
    """Ends a subcommand: ``message`` goes to stderr, ``code`` is the exit code."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


def fail(code: int, message: str) -> NoReturn:
    """Raise :class:`CliError`."""
    raise CliError(code, message)


def report(error: CliError) -> int:
    """Print ``error`` on stderr; returns its exit code."""
    print(f"klockwork: {error.message}", file=sys.stderr)
    return error.code


def is_loopback(host: str) -> bool:
    """True for a name or address only this machine can reach.

    ``localhost``, ``127.0.0.0/8`` and ``::1`` (bracketed or not). Any other
    name is *not* loopback, even one that resolves to 127.0.0.1 today: what
    a name resolves to can change, an address cannot.
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def open_shared(url: str | None, *, create: bool = False, **kwargs: Any) -> Klockwork:
    """Open an engine on an *existing* shared store: ``url``, else ``$KLOCKWORK_URL``.

    A command that reads or changes what other processes stored makes no sense
    on ``memory://`` (a new, empty store) nor on a SQLite path that does not
    exist yet (opening it would create an empty one), so both are refused;
    ``create=True`` (``klockwork keys create``, which sets up a store before
    its server first runs) lets a new SQLite file be made.

    Raises:
        CliError: USAGE for a missing, in-memory, unknown or absent store;
            UNAVAILABLE when the store cannot be opened.
    """
    chosen = url or os.environ.get("KLOCKWORK_URL")
    if not chosen:
        fail(USAGE, "no store given: pass --url sqlite:///PATH or set $KLOCKWORK_URL")
    scheme, _, rest = chosen.partition("://")
    if chosen == "memory" or scheme.lower() == "memory":
        fail(
            USAGE,
            f"{chosen} would be a new, empty in-memory store; "
            "pass the shared store's URL, e.g. --url sqlite:///kw.db",
        )
    if scheme.lower() == "sqlite" and rest.startswith("/"):  # else open() says what is wrong
        path = rest[1:]
        if path and path != ":memory:" and not os.path.isfile(path) and not create:
            fail(USAGE, f"no SQLite store at {path} (from {chosen}); opening it would create one")
    try:
        return Klockwork.open(chosen, **kwargs)
    except InvalidRequestError as exc:
        fail(USAGE, str(exc))
    except StoreUnavailableError as exc:
        fail(UNAVAILABLE, str(exc))
