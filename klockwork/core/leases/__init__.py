"""Leases: who may touch which resource, and how (the first pillar).

* :mod:`.rules` — the pure decisions (KLIS matrix, paths, wait-die); the
  stores call them inside their atomic sections, so it sits *below* the
  stores and imports only the ground floor (model, errors).
* :mod:`.manager` — ``kw.leases``: requests, waiting, DIE back-off, fencing,
  one outcome per call; :mod:`.acquiring` — the blocking acquire, one flow
  driven by a sync and an async loop; :mod:`.holding` — ``with
  kw.leases.hold(...)``; :mod:`.renewer` — the one thread that renews held leases.

May import: the ground floor (``model``, ``errors``, ``clock``, ``events``,
``notify``), :mod:`klockwork.core.stores`, and the audit trail's record
formats (:mod:`klockwork.core.audit.records`). Never the engine, the
integrations or the CLI.
"""
