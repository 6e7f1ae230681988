"""The klockwork engine. Imports nothing from LangChain or LangGraph.

The floors, bottom up — a module imports only from its own floor or below,
and no two modules import each other (``tests/unit/test_layers.py`` checks):

1. the ground floor, shared by all: ``model``, ``errors``, ``clock``,
   ``events`` (the one internal hook), ``notify`` (keyed wake-ups),
   ``validation`` (the checks every entry point applies to its arguments);
2. ``leases/rules``: the pure lease decisions the stores apply;
3. ``stores/``: thin atomic layers (memory, SQLite);
4. the pillars and the trail: ``leases/``, ``governance/``, ``bus/``, ``audit/``;
5. ``engine`` (``Klockwork``: wires the parts over one store) and
   ``compat`` (``KlockClient``, Klock's dict API).

Above the core: ``klockwork.integrations`` (LangChain, LangGraph) and
``klockwork.cli``. See ``docs/architecture.md`` for the map.
"""

import sys as _sys

from klockwork.core.audit import chain as _chain
from klockwork.core.leases import rules as _rules

# Scripts written against klockwork 0.1 import two modules by their old flat
# paths (the probes in particular); they keep working until 0.3. New code
# imports klockwork.core.leases.rules and klockwork.core.audit.chain.
_sys.modules.setdefault("klockwork.core.rules", _rules)
_sys.modules.setdefault("klockwork.core.audit_chain", _chain)
