"""``klockwork approvals list | approve | deny``: decide gated actions from a shell.

See :mod:`klockwork.cli` for the exit codes. The decider's name comes from
``--approver``, else ``$KLOCKWORK_APPROVER``; there is no fallback to the
login name, because a vote is a claim of identity: a missing approver is a
usage error (2), never a silent ``root``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Literal

from klockwork.cli.support import INVALID, OK, UNAVAILABLE, USAGE, fail, open_shared
from klockwork.core.errors import (
    ApprovalNotFoundError,
    InvalidRequestError,
    NotAnApproverError,
    StoreUnavailableError,
)
from klockwork.core.governance.approvals import Approval, ApprovalClosedError, ApprovalStatus

__all__ = ["add_parsers", "run"]

_STATUSES = ("pending", "approved", "denied", "expired", "all")
_URL_HELP = "the shared store (default: $KLOCKWORK_URL); memory:// is refused"


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``approvals`` and its subcommands to the top-level parser."""
    approvals = commands.add_parser("approvals", help="list, approve or deny pending approvals")
    sub = approvals.add_subparsers(dest="approvals_command", required=True)

    listing = sub.add_parser("list", help="list approvals (pending by default)")
    listing.add_argument("--url", help=_URL_HELP)
    listing.add_argument("--status", choices=_STATUSES, default="pending")
    listing.add_argument("--json", action="store_true", help="a JSON array of approvals")

    for name, text, note in (
        ("approve", "approve an approval", "--comment"),
        ("deny", "deny an approval (one eligible deny decides)", "--reason"),
    ):
        vote = sub.add_parser(name, help=text)
        vote.add_argument("approval_id", metavar="ID", help="the approval's id (apr_...)")
        vote.add_argument(
            "--approver", help="who decides (default: $KLOCKWORK_APPROVER; required one way)"
        )
        vote.add_argument(note, dest="note", default="", help="free text kept with the vote")
        vote.add_argument("--url", help=_URL_HELP)
        vote.add_argument("--json", action="store_true", help="print the approval as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``klockwork approvals ...``; raises ``CliError`` for a failure."""
    if args.approvals_command == "list":
        return _list(args)
    return _vote(args, "approve" if args.approvals_command == "approve" else "deny")


def _list(args: argparse.Namespace) -> int:
    with open_shared(args.url) as kw:
        try:
            approvals = kw.approvals.list(status=None if args.status == "all" else args.status)
        except StoreUnavailableError as exc:
            fail(UNAVAILABLE, str(exc))
        now = kw.clock.now_ms()
    if args.json:  # one JSON array, [] when empty
        print(json.dumps([a.model_dump(mode="json") for a in approvals]))
        return OK
    if not approvals:
        print("no approvals" if args.status == "all" else f"no {args.status} approvals")
        return OK
    rows = [("ID", "ACTION", "REQUESTER", "POLICY", "STATUS", "AGE", "DEADLINE", "VOTES")]
    rows += [_row(a, now) for a in approvals]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
    return OK


def _row(approval: Approval, now_ms: int) -> tuple[str, str, str, str, str, str, str, str]:
    approvals = sum(d.verdict == "approve" for d in approval.decisions)
    denials = len(approval.decisions) - approvals
    votes = f"{approvals}/{approval.quorum}" + (f" ({denials} deny)" if denials else "")
    if approval.deadline_ms is None:
        deadline = "none"
    elif approval.status is ApprovalStatus.PENDING:
        deadline = "in " + _span(approval.deadline_ms - now_ms)
    else:
        deadline = "-"
    return (
        approval.approval_id,
        approval.action,
        approval.requester,
        approval.policy_name or "-",
        approval.status.value,
        _span(now_ms - approval.created_at_ms),
        deadline,
        votes,
    )


def _span(ms: int) -> str:
    """``ms`` as a short duration: ``42s``, ``5m``, ``3h``, ``2d``."""
    s = max(0, ms) // 1000
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _approver(args: argparse.Namespace) -> str:
    approver = args.approver if args.approver is not None else os.environ.get("KLOCKWORK_APPROVER")
    if approver is None or not approver.strip():
        fail(USAGE, "who is deciding? pass --approver NAME or set $KLOCKWORK_APPROVER")
    return approver


def _vote(args: argparse.Namespace, verdict: Literal["approve", "deny"]) -> int:
    approver = _approver(args)
    with open_shared(args.url) as kw:
        try:
            if verdict == "approve":
                approval = kw.approvals.approve(args.approval_id, approver, comment=args.note)
            else:
                approval = kw.approvals.deny(args.approval_id, approver, reason=args.note)
        except ApprovalNotFoundError:
            fail(USAGE, f"no approval {args.approval_id!r} in this store")
        except NotAnApproverError as exc:
            fail(INVALID, f"refused: {exc}")
        except ApprovalClosedError as exc:
            mine = [d.verdict for d in exc.approval.decisions if d.approver == approver]
            outcome = ApprovalStatus.APPROVED if verdict == "approve" else ApprovalStatus.DENIED
            if mine != [verdict] or exc.status is not outcome:  # not a retried, counted vote
                fail(INVALID, f"refused: approval {exc.approval_id!r} is already {exc.status}")
            approval = exc.approval
        except InvalidRequestError as exc:
            if exc.argument == "verdict":  # the approver already voted the other way
                fail(INVALID, f"refused: {exc.problem}")
            fail(USAGE, str(exc))
        except StoreUnavailableError as exc:
            fail(UNAVAILABLE, str(exc))
    if args.json:
        print(approval.model_dump_json())
        return OK
    approvals = sum(d.verdict == "approve" for d in approval.decisions)
    if approval.status is ApprovalStatus.PENDING:
        print(
            f"vote counted: {approval.approval_id} has {approvals}/{approval.quorum} "
            "approvals and is still pending"
        )
    else:
        print(f"{approval.approval_id} is {approval.status.value} ({approval.action})")
    return OK
