"""``klockwork approvals list | approve | deny``: decide gated actions from a shell.

See :mod:`klockwork.cli` for the exit codes. The decider's name comes from
``--approver``, else ``$KLOCKWORK_APPROVER``; there is no fallback to the
login name, because a vote is a claim of identity: a missing approver is a
usage error (2), never a silent ``root``.

With ``--server`` (a running ``klockwork serve``, see :mod:`.remote`) the
vote is cast as the API key's principal: the server takes identity from the
key only. ``--approver`` is then refused (2) rather than ignored, so that
nobody believes they voted under the name they typed; ``$KLOCKWORK_APPROVER``
is ignored (it is ambient, often set for the store-backed form).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.parse
from typing import Literal

from klockwork.cli.remote import Remote, add_server_options, remote_for
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
    add_server_options(listing)
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
        add_server_options(vote)
        vote.add_argument("--json", action="store_true", help="print the approval as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``klockwork approvals ...``; raises ``CliError`` for a failure."""
    if args.approvals_command == "list":
        return _list(args)
    return _vote(args, "approve" if args.approvals_command == "approve" else "deny")


def _list(args: argparse.Namespace) -> int:
    remote = remote_for(args)
    if remote is not None:
        approvals, now = _list_remote(remote, args.status)
    else:
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


def _list_remote(remote: Remote, status: str) -> tuple[list[Approval], int]:
    """The approvals a server lists, and its clock (ages and deadlines count from it)."""
    found = remote.get("/v1/approvals", status=status)
    if not isinstance(found, list):
        fail(UNAVAILABLE, "the server's answer is not a list of approvals")
    now = found[0].get("now_ms") if found and isinstance(found[0], dict) else None
    approvals = [_approval(item) for item in found]
    return approvals, now if isinstance(now, int) and now > 0 else int(time.time() * 1000)


def _approval(data: object) -> Approval:
    try:
        return Approval.model_validate(data)  # the view's extra fields are dropped
    except ValueError:
        fail(UNAVAILABLE, "the server answered something that is not an approval")


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
    remote = remote_for(args)
    if remote is not None:
        if args.approver is not None:
            fail(
                USAGE,
                "with --server the vote is cast as the API key's principal: "
                "drop --approver (the key says who you are)",
            )
        path = f"/v1/approvals/{urllib.parse.quote(args.approval_id, safe='')}/{verdict}"
        return _show(args, _approval(remote.post(path, {"comment": args.note})))
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
    return _show(args, approval)


def _show(args: argparse.Namespace, approval: Approval) -> int:
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
