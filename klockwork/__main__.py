"""``python -m klockwork``: the same as the ``klockwork`` command."""

import sys

from klockwork.cli.main import main

sys.exit(main())
