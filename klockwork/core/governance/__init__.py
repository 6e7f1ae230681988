"""Governance: which actions run, which are refused, which wait for a human (the second pillar).

* :mod:`.policy` — policies and the pure decision (most specific wins, fail
  closed); :mod:`.policy_files` — loading them from YAML/JSON;
  :mod:`.policies` — ``kw.policies``, the engine's policy set.
* :mod:`.approvals` — the pure state machines of approvals and circuit
  breakers; :mod:`.approval_desk` — ``kw.approvals`` over the store.
* :mod:`.outcomes` — what a gate decided (``ActionResult``, the stored
  record, the sentences that explain a refusal); :mod:`.gates` —
  ``kw.gates``: decide, wait, and the one-call ``ask``/``answer`` the
  integrations use.
* :mod:`.delegation` — agent profiles, capabilities, scoped delegation.

May import: the ground floor, :mod:`klockwork.core.leases.rules` and
:mod:`klockwork.core.stores`. Never the engine, the integrations or the CLI.
"""
