"""What a gate decided: results, stored records, audit entries, and the words for them.

The data of :mod:`klockwork.core.governance.gates`, apart from its logic:

* :class:`ActionResult` — one decision as a caller sees it; :class:`GateRecord`
  — as the store keeps it (idempotency on ``event_id``, approvals, reports);
  :class:`GateAnswer` — what an integration needs from *one* call to act:
  the settled result, the approval a human must decide, and the sentence
  that explains a refusal;
* how gate keys and approval ids are made (``evt_`` + a digest of the
  ``event_id``, so every process finds the same record; else a per-process
  counter);
* the sentences: why a policy held or refused an action, how an approval
  ended, and :func:`refusal_text` for people and models.
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
import json
import json.encoder
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from klockwork.core.audit.canonical import (
    checked_plain_json,
    exact_str_json,
    exact_str_or_null_json,
    plain_json,
)
from klockwork.core.errors import GateDeniedError, InvalidRequestError, describe
from klockwork.core.governance.approvals import (
    APPROVAL_KIND,
    GATE_KIND,
    Approval,
    ApprovalStatus,
)
from klockwork.core.governance.policy import ConditionResult
from klockwork.core.validation import (
    MAX_JSON_DEPTH,
    check_identity,
    check_json_object,
    check_key,
)

__all__ = [
    "BREAKER",
    "CAPABILITY_DENIED",
    "GATE",
    "GATE_NAMES",
    "OUTCOME_KIND",
    "REPORT_STATUSES",
    "ActionResult",
    "GateAnswer",
    "GateEntry",
    "GateRecord",
    "action_digest",
    "approval_id_for",
    "check_gate_args",
    "edit_event_id",
    "explain_approval",
    "explain_policy",
    "gate_key",
    "new_gate_key",
    "refusal_text",
    "result_fields",
    "waits",
]

CAPABILITY_DENIED = "CAPABILITY_DENIED"
GATE = GATE_KIND  # record kind
BREAKER = "breaker"
_FROZEN = ConfigDict(frozen=True)
REPORT_STATUSES = ("success", "failure", "partial")
Status = Literal["executed", "requested", "denied"]
OUTCOME_KIND = {
    "executed": "action.executed",
    "denied": "action.denied",
    "requested": "action.requested",
}


class ActionResult(BaseModel):
    """What a gate decided about one action.

    Attributes:
        status: ``executed`` (go ahead), ``requested`` (waiting for an
            approval) or ``denied``.
        audit_event_id: the gate's audit id: pass it to ``kw.gates.report``.
            None for a dry run (:meth:`Gates.can_i`).
        approval_id: the approval this action waits for (or waited for).
        policy_name: the deciding policy; None for the default effect.
        denial_reason: why it was denied (``CONDITIONS_DENIED``,
            ``POLICY_DENIED``, ``NO_POLICY``, ``CAPABILITY_DENIED``,
            ``CIRCUIT_OPEN``, ``DENIED_BY_REVIEWER``, ``APPROVAL_EXPIRED``).
        conditions_evaluated: every condition of the deciding policy, with the
            expected and the actual value, so an agent can adapt.
        message: a sentence for people and models.
    """

    model_config = _FROZEN
    status: Status
    audit_event_id: str | None = None
    approval_id: str | None = None
    policy_name: str | None = None
    denial_reason: str | None = None
    conditions_evaluated: list[ConditionResult] = []
    message: str = ""


class GateRecord(BaseModel):
    """A gate's stored outcome (idempotency, approvals, reports)."""

    model_config = _FROZEN
    audit_event_id: str
    event_id: str | None
    agent_id: str
    session_id: str | None
    action: str
    metadata: dict[str, Any]
    result: ActionResult
    created_at_ms: int
    reported: str | None = None
    #: What it decided, as a digest of agent, action and metadata
    #: (:func:`action_digest`): its ``event_id`` serves that action only.
    #: "" for a gate without an ``event_id`` (nothing replays it by id).
    digest: str = ""
    #: The event id of the edit that replaced this request, if an approver edited it.
    replaced_by: str | None = None

    @property
    def status(self) -> str:
        """The result's status (what the store lists records by)."""
        return self.result.status

    # -- retention (see stores.base.in_play) -------------------------------------------
    def retention_link(self) -> tuple[str, str] | None:
        """The approval this outcome waits for, if it asked for one."""
        approval_id = self.result.approval_id
        return None if approval_id is None else (APPROVAL_KIND, approval_id)

    def in_play(self, approval_status: str | None) -> bool:
        """Kept while its approval is pending; once decided, a re-run settles it.

        (A request decided out of band and never re-run must not be kept
        forever; its approval stays as long as this record does.)
        """
        return self.result.status == "requested" and approval_status == "pending"


class GateEntry(NamedTuple):
    """A gate outcome as the audit writer turns it into entry data (read off the hot path)."""

    result: ActionResult
    action: str
    metadata: Mapping[str, Any]
    event_id: str | None
    #: ``metadata``'s canonical JSON, when the gate already made it.
    metadata_json: str | None = None

    def __audit_data__(self) -> dict[str, Any]:
        r = self.result
        data: dict[str, Any] = {
            "audit_event_id": r.audit_event_id,
            "action": self.action,
            "metadata": dict(self.metadata),
            "policy": r.policy_name,
        }
        if self.event_id is not None:
            data["event_id"] = self.event_id
        if r.approval_id is not None:
            data["approval_id"] = r.approval_id
        if r.denial_reason is not None:
            data["reason"] = r.denial_reason
        if r.conditions_evaluated:
            data["conditions"] = [c.model_dump(mode="json") for c in r.conditions_evaluated]
        return data

    def __audit_json__(self) -> str:
        """:meth:`__audit_data__` as canonical JSON text (the contract: ``audit.canonical``).

        Raises ``TypeError`` for what it does not format (evaluated
        conditions, a value of an unexpected type, metadata that is not JSON
        data as is): the writer then takes the generic way.
        """
        r = self.result
        if r.conditions_evaluated:
            raise TypeError("evaluated conditions: the generic way")
        parts = [f'"action":{exact_str_json(self.action)}']
        if r.approval_id is not None:
            parts.append(f'"approval_id":{exact_str_json(r.approval_id)}')
        parts.append(f'"audit_event_id":{exact_str_or_null_json(r.audit_event_id)}')
        if self.event_id is not None:
            parts.append(f'"event_id":{exact_str_json(self.event_id)}')
        metadata = self.metadata_json
        if metadata is None:
            metadata = plain_json(dict(self.metadata))
        parts.append(f'"metadata":{metadata}')
        parts.append(f'"policy":{exact_str_or_null_json(r.policy_name)}')
        if r.denial_reason is not None:
            parts.append(f'"reason":{exact_str_json(r.denial_reason)}')
        return "{" + ",".join(parts) + "}"


GATE_NAMES = ("kw.gates.gate(...)", "await kw.gates.agate(...)")


def waits(result: ActionResult) -> bool:
    return result.status == "requested" and result.approval_id is not None


def result_fields(
    status: Status,
    policy_name: str | None,
    denial_reason: str | None,
    conditions: builtins.list[ConditionResult],
    message: str,
) -> dict[str, Any]:
    return {
        "status": status,
        "audit_event_id": None,
        "approval_id": None,
        "policy_name": policy_name,
        "denial_reason": denial_reason,
        "conditions_evaluated": conditions,
        "message": message,
    }


# Gate keys without an event_id: a per-process random prefix and a counter
# (next() on a count is atomic). os.urandom per call would release the GIL on
# every gate and hand it to the audit writer mid-decision.
_key_counter = itertools.count(1)
_key_prefix = os.urandom(9).hex()


def _new_prefix() -> None:
    global _key_prefix, _key_counter
    _key_prefix = os.urandom(9).hex()
    _key_counter = itertools.count(1)


os.register_at_fork(after_in_child=_new_prefix)  # a forked child must not reuse keys


def new_gate_key() -> str:
    return f"act_{_key_prefix}{next(_key_counter):x}"


def gate_key(event_id: str) -> str:
    return "evt_" + hashlib.sha256(event_id.encode()).hexdigest()[:24]


def approval_id_for(audit_event_id: str) -> str:
    return "apr_" + audit_event_id.partition("_")[2]


class GateAnswer(NamedTuple):
    """One gate decision with everything an edge needs to act on it, from one call.

    Attributes:
        result: the decision, with its approval's outcome applied once decided.
        approval: the approval a human decides (pending or decided), if one was asked for.
        refusal: for a denied action, the sentence for people and models
            (:func:`refusal_text`); empty otherwise.
        action: the gated action.
    """

    result: ActionResult
    approval: Approval | None
    refusal: str
    action: str
    #: Set when an approver's edit replaced this request: the edit's event id
    #: (its own gate, judged again). The request itself ends denied.
    replaced_by: str | None = None

    @property
    def pending(self) -> bool:
        """True while the action waits for a human's decision."""
        return self.result.status == "requested" and self.approval is not None

    def denied_error(self) -> GateDeniedError:
        """The :class:`~klockwork.GateDeniedError` of a refusal, worded as :attr:`refusal`."""
        r = self.result
        return GateDeniedError(
            r.denial_reason or "POLICY_DENIED",
            r.policy_name,
            r.conditions_evaluated,
            r.approval_id,
            message=self.refusal or refusal_text(self.action, r, self.approval),
        )


def explain_policy(
    action: str, policy: str | None, reason: str | None, conditions: Iterable[ConditionResult]
) -> str:
    """Why a policy refused ``action`` or sent it to a human ("" when it allowed it)."""
    if reason is None:
        return ""
    failed = [c for c in conditions if not c.result]
    why = "; ".join(
        f"{c.field} {c.operator.value} {describe(c.expected)} failed (actual {describe(c.actual)})"
        for c in failed
    )
    where = f"policy {policy!r}" if policy else "no policy matches"
    return f"{action}: {reason} by {where}" + (f": {why}" if why else "")


_PAST = {"approve": "approved", "deny": "denied"}


def explain_approval(approval: Approval) -> str:
    """How an approval ended: who decided what, or that it expired."""
    if approval.status is ApprovalStatus.EXPIRED:
        return f"approval {approval.approval_id} expired (on_timeout={approval.on_timeout})"
    who = ", ".join(f"{d.approver} {_PAST[d.verdict]}" for d in approval.decisions)
    return f"approval {approval.approval_id} {approval.status.value}: {who}"


def refusal_text(action: str, result: ActionResult, approval: Approval | None = None) -> str:
    """A sentence for people and models: why ``action`` did not run.

    Names the reason and the policy, the conditions that decided (a deny
    policy refuses when they hold, any other when they fail, with the
    actual values, so an agent can adapt), and the approvers' comments.
    """
    reason = result.denial_reason or "DENIED"
    text = f"{action} was not run: {reason}"
    if result.policy_name:
        text += f" (policy {result.policy_name!r})"
    matched = result.denial_reason == "POLICY_DENIED"
    shown = [c for c in result.conditions_evaluated if c.result is matched]
    if shown:
        text += ("; matched: " if matched else "; failed: ") + "; ".join(
            f"{c.field} {c.operator.value} {c.expected!r} (actual {c.actual!r})" for c in shown
        )
    if approval is not None:
        said = [f"{d.approver}: {d.comment}" for d in approval.decisions if d.comment]
        if said:
            text += "; " + "; ".join(said)
    elif result.message and not shown:  # e.g. a capability or breaker refusal
        text += f"; {result.message}"
    return text


def action_digest(
    agent_id: str,
    action: str,
    metadata: Mapping[str, Any] | None,
    metadata_json: str | None = None,
) -> str:
    """A digest binding a gate decision (and its approval) to one exact action.

    Stored with gate records, so its text never changes: the ``json.dumps``
    below (ASCII, sorted keys, no spaces). Without metadata (the common
    gate), or with ``metadata_json`` (its canonical text, which is the
    ``json.dumps`` form when it is ASCII without DEL, the one ASCII
    character only ``ensure_ascii`` escapes), the same text is formatted directly.
    """
    if agent_id.__class__ is str and action.__class__ is str and not metadata:
        text = f"[{_ascii_json(agent_id)},{_ascii_json(action)},{{}}]"
    elif (
        metadata_json is not None
        and metadata_json.isascii()
        and "\x7f" not in metadata_json
        and agent_id.__class__ is str
        and action.__class__ is str
    ):
        text = f"[{_ascii_json(agent_id)},{_ascii_json(action)},{metadata_json}]"
    else:
        text = json.dumps(
            [agent_id, action, dict(metadata or {})],
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_ascii_json: Callable[[str], str] = json.encoder.encode_basestring_ascii


def check_gate_args(
    agent_id: object, action: object, metadata: object, event_id: object
) -> str | None:
    """Check a gate's arguments; return the metadata's canonical JSON if one pass made it.

    Plain metadata (the usual: text, numbers without floats, nesting) is
    checked and encoded in one pass (``checked_plain_json``), and the text
    serves the action digest and the audit entry; anything else is checked
    the slow way, which names the problem.
    """
    check_identity(agent_id, "agent_id")
    check_key(action, "action", max_chars=512)
    text = None
    if metadata is not None:
        text = checked_plain_json(metadata, MAX_JSON_DEPTH)
        if text is None:
            if not isinstance(metadata, Mapping):
                raise InvalidRequestError("metadata", metadata, "must be a dict or None")
            check_json_object(dict(metadata), "metadata")
    if event_id is not None:
        check_key(event_id, "event_id", max_chars=2048)
    return text


def edit_event_id(record: GateRecord, edited: Mapping[str, Any]) -> str:
    """The event id of an edit of ``record``: the same for the same edit, on every replay."""
    base = record.event_id or record.audit_event_id
    text = json.dumps(dict(edited), sort_keys=True, separators=(",", ":"), default=str)
    return f"{base}#edit-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
