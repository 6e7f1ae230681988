"""The ``klockwork`` command line (``klockwork leases | approvals | audit | bus``).

* :mod:`.main` — the parser and ``main()``, the exit codes;
  :mod:`.support` — what every subcommand shares (opening a shared store,
  failing with a code);
* one module per command: :mod:`.leases`, :mod:`.approvals`, :mod:`.audit`,
  :mod:`.bus`.

May import anything below it (the engine and the core); nothing imports it.
"""

from klockwork.cli.main import main
from klockwork.cli.support import INVALID, OK, UNAVAILABLE, USAGE

__all__ = ["INVALID", "OK", "UNAVAILABLE", "USAGE", "main"]
