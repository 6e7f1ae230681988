"""The ``klockwork`` command line (``klockwork leases | approvals | audit | bus | serve | keys``).

* :mod:`.main` — the parser and ``main()``, the exit codes;
  :mod:`.support` — what every subcommand shares (opening a shared store,
  failing with a code);
* one module per command: :mod:`.leases`, :mod:`.approvals`, :mod:`.audit`,
  :mod:`.bus`, :mod:`.serve`, :mod:`.keys`;
* :mod:`.remote` — ``--server URL``: the HTTP API of a running
  ``klockwork serve`` instead of the store (standard library only).

``serve`` imports FastAPI and uvicorn only when it runs; every other command
works without the ``server`` extra.

May import anything below it (the engine and the core) and :mod:`klockwork.server.keys`
(which needs no web framework); nothing imports it.
"""

from klockwork.cli.main import main
from klockwork.cli.support import INVALID, OK, UNAVAILABLE, USAGE

__all__ = ["INVALID", "OK", "UNAVAILABLE", "USAGE", "main"]
