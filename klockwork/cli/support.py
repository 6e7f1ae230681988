"""What the ``klockwork`` subcommands share: exit codes, opening a shared store, failing."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError

__all__ = ["INVALID", "OK", "UNAVAILABLE", "USAGE", "CliError", "fail", "open_shared"]

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


def open_shared(url: str | None, **kwargs: Any) -> Klockwork:
    """Open an engine on an *existing* shared store: ``url``, else ``$KLOCKWORK_URL``.

    A command that reads or changes what other processes stored makes no sense
    on ``memory://`` (a new, empty store) nor on a SQLite path that does not
    exist yet (opening it would create an empty one), so both are refused.

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
        if path and path != ":memory:" and not os.path.isfile(path):
            fail(USAGE, f"no SQLite store at {path} (from {chosen}); opening it would create one")
    try:
        return Klockwork.open(chosen, **kwargs)
    except InvalidRequestError as exc:
        fail(USAGE, str(exc))
    except StoreUnavailableError as exc:
        fail(UNAVAILABLE, str(exc))
