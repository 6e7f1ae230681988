"""What each section of the inbox shows, read from the engine: plain data for the templates.

The sections are ``pending`` (approvals waiting for a human, with what
decides whether the signed-in person may vote), ``history`` (decided and
expired approvals, newest first), ``leases`` (the lease board) and
``audit`` (the newest entries of the trail). Each is read in one go from
the store, in a worker thread (never on the event loop).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any, Literal

from klockwork.core.audit.chain import AuditEntry
from klockwork.core.audit.paging import encode_cursor
from klockwork.core.governance.approvals import Approval, ApprovalStatus, Decision, is_eligible
from klockwork.core.model import Lease
from klockwork.server.decisions import ApprovalView
from klockwork.server.inbox.base import Inbox
from klockwork.server.keys import ApiKey

__all__ = ["SECTIONS", "ArgumentField", "Item", "Views"]

#: The sections a page may hold, each with a template ``_<name>.html``.
SECTIONS = ("pending", "history", "leases", "audit")
HISTORY_SIZE = 50
AUDIT_TAIL = 50

FieldKind = Literal["text", "number", "bool", "null"]


@dataclass(frozen=True)
class ArgumentField:
    """One top-level argument of plain type, as an input of the edit form."""

    name: str
    value: Any
    kind: FieldKind


def fields_of(metadata: dict[str, Any]) -> tuple[list[ArgumentField], dict[str, Any]]:
    """The plain arguments (one input each) and the nested ones (one JSON text area)."""
    plain: list[ArgumentField] = []
    nested: dict[str, Any] = {}
    for name, value in metadata.items():
        if isinstance(value, bool):
            plain.append(ArgumentField(name, value, "bool"))
        elif isinstance(value, int | float):
            plain.append(ArgumentField(name, value, "number"))
        elif isinstance(value, str):
            plain.append(ArgumentField(name, value, "text"))
        elif value is None:
            plain.append(ArgumentField(name, value, "null"))
        else:
            nested[name] = value
    return plain, nested


@dataclass(frozen=True)
class Item:
    """One approval as a card: its view, its arguments, and what the viewer may do."""

    view: ApprovalView
    plain: list[ArgumentField]
    nested: dict[str, Any]
    may_decide: bool
    why_not: str = ""
    voted: Decision | None = None
    replaced_by: str | None = None


class Views:
    """Reads the sections for one signed-in person."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox
        self._kw = inbox.server.kw

    def _item(self, approval: Approval, key: ApiKey) -> Item:
        view = self._inbox.decisions.view(approval)
        plain, nested = fields_of(approval.metadata)
        voted = next((d for d in approval.decisions if d.approver == key.principal), None)
        why_not = ""
        if approval.status is not ApprovalStatus.PENDING:
            why_not = f"already {approval.status.value}"
        elif voted is not None:
            why_not = "you have voted on it"
        elif self._inbox.decisions.runs_the_agent(approval, key):
            why_not = f"you run {approval.requester}, the agent that asked: someone else decides"
        elif not is_eligible(approval, key.principal):
            why_not = "the policy does not name you among its approvers"
        replaced_by = None
        if approval.audit_event_id and approval.status is ApprovalStatus.DENIED:
            record = self._kw.gates.get(approval.audit_event_id)
            replaced_by = None if record is None else record.replaced_by
        return Item(view, plain, nested, not why_not, why_not, voted, replaced_by)

    def pending(self, key: ApiKey) -> list[Item]:
        """Pending approvals, oldest first (the one waiting longest on top)."""
        return [self._item(a, key) for a in self._kw.approvals.list(status="pending")]

    def history(self, key: ApiKey) -> list[Item]:
        """Decided and expired approvals, the most recently decided first."""
        done = [a for a in self._kw.approvals.list(status=None) if a.status.value != "pending"]
        done.sort(key=lambda a: a.decided_at_ms or a.created_at_ms, reverse=True)
        return [self._item(a, key) for a in done[:HISTORY_SIZE]]

    def leases(self) -> builtins.list[Lease]:
        """Every active lease, oldest first."""
        return self._kw.leases.list()

    def audit(self) -> builtins.list[AuditEntry]:
        """The newest entries of the audit trail, newest first."""
        head = self._kw.audit.checkpoint().seq
        start = max(0, head - AUDIT_TAIL)
        page = self._kw.audit.query(cursor=encode_cursor(start), limit=AUDIT_TAIL)
        return builtins.list(reversed(page.entries))

    def section(self, name: str, key: ApiKey) -> dict[str, Any]:
        """The template context of section ``name``."""
        now = self._kw.clock.now_ms()
        if name == "pending":
            return {"items": self.pending(key), "now_ms": now}
        if name == "history":
            return {"items": self.history(key), "now_ms": now}
        if name == "leases":
            return {"leases": self.leases(), "waiters": self._kw.leases.waiters(), "now_ms": now}
        return {"entries": self.audit(), "now_ms": now}
