"""The audit trail: every decision, hash-chained, verifiable by anyone.

* :mod:`.chain` — the entry and chain format (specified in its docstring so
  anyone can re-verify with ``hashlib``), checkpoints; :mod:`.canonical` —
  canonical JSON text; :mod:`.verify` — streaming verification.
* :mod:`.records` — what the lease manager hands over, and its direct JSON;
  :mod:`.encode` — the writer's batch encoding (fast path and the
  documented conversion).
* :mod:`.log` — ``kw.audit``: record in order on the hot path, seal and
  store on the writer thread; query, export, checkpoint.
* :mod:`.backend` (memory) and :mod:`.sqlite` — where the chain is kept.

May import: the ground floor and :mod:`klockwork.core.leases.rules`. Never
the other pillars' managers, the engine, the integrations or the CLI.
"""

from klockwork.core.audit.log import AuditLog, export_jsonl, verify_file

__all__ = ["AuditLog", "export_jsonl", "verify_file"]
