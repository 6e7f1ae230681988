"""``klockwork audit verify | tail``: check and watch an audit trail.

``verify`` takes an exported JSON Lines file (offline) or a store URL (the
chain as stored, e.g. the ``kw_audit`` table of a SQLite file). ``tail``
prints the last entries of a shared store (or, with ``--server``, of a
running server's: ``GET /v1/audit``) and, with ``--follow``, keeps printing
new ones until Ctrl-C (exit 0). See :mod:`klockwork.cli` for the
exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial

from pydantic import ValidationError

from klockwork.cli.remote import Remote, add_server_options, remote_for
from klockwork.cli.support import INVALID, OK, UNAVAILABLE, USAGE, fail, open_shared
from klockwork.core.audit.chain import AuditEntry, Checkpoint, VerifyResult
from klockwork.core.audit.log import verify_file
from klockwork.core.audit.paging import AuditPage
from klockwork.core.errors import AuditIntegrityError, InvalidRequestError, StoreUnavailableError

__all__ = ["add_parsers", "run"]

_PAGE = 1000
_DATA_WIDTH = 80


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit tail`` to the top-level parser."""
    audit = commands.add_parser("audit", help="audit trail tools")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    verify = sub.add_parser("verify", help="verify an exported audit file or a store's chain")
    verify.add_argument(
        "file",
        metavar="FILE|URL",
        help="a file written by kw.audit.export(path), or a store URL (sqlite:///kw.db)",
    )
    verify.add_argument(
        "--checkpoint", help="a JSON checkpoint (kw.audit.checkpoint()) to catch truncation"
    )
    verify.add_argument(
        "--key-env",
        metavar="VAR",
        help="environment variable holding the HMAC key that signed the checkpoint",
    )
    verify.add_argument(
        "--ignore-signature",
        action="store_true",
        help="verify against a signed checkpoint without its key (the signature is NOT checked)",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")

    tail = sub.add_parser("tail", help="print the last audit entries of a shared store")
    tail.add_argument("--url", help="the shared store (default: $KLOCKWORK_URL)")
    tail.add_argument("-n", type=_count, default=10, metavar="N", help="entries (default 10)")
    tail.add_argument("--kind", help="only this kind (e.g. action.requested)")
    tail.add_argument("--agent", help="only this agent's entries")
    tail.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new entries until Ctrl-C"
    )
    tail.add_argument(
        "--interval", type=float, default=0.5, help="seconds between polls with --follow"
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per entry")
    add_server_options(tail)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``klockwork audit ...``; raises ``CliError`` for a failure."""
    if args.audit_command == "tail":
        return _tail(args)
    return _verify(args)


# ----------------------------------------------------------------------------- verify
def _verify(args: argparse.Namespace) -> int:
    key: bytes | None = None
    if args.key_env:
        value = os.environ.get(args.key_env)
        if not value:
            fail(USAGE, f"${args.key_env} is not set")
        key = value.encode()
    checkpoint: Checkpoint | None = None
    try:
        if args.checkpoint:
            with open(args.checkpoint, encoding="utf-8") as f:
                checkpoint = Checkpoint.model_validate_json(f.read())
            if checkpoint.signature is not None and key is None and not args.ignore_signature:
                # A signature nobody checked must never read as checked.
                fail(
                    USAGE,
                    f"{args.checkpoint} is signed: pass --key-env VAR (the variable holding "
                    "the HMAC key) to check its signature, or --ignore-signature to verify "
                    "without checking it",
                )
        if "://" in args.file:
            result = _verify_store(args.file, checkpoint, key)
        else:
            result = verify_file(args.file, against=checkpoint, key=key)
    except (OSError, ValidationError) as exc:
        fail(USAGE, f"cannot read input: {exc}")
    unchecked = checkpoint is not None and checkpoint.signature is not None and key is None
    if args.json:
        out = result.model_dump(mode="json")
        if unchecked:
            out["signature_checked"] = False
        print(json.dumps(out))
    else:
        print(_describe(result, unchecked))
    return OK if result.valid else INVALID


def _describe(result: VerifyResult, signature_unchecked: bool) -> str:
    """One line a person reads: the verdict first, then what it rests on."""
    if result.valid:
        text = f"valid: {result.reason}."
        if signature_unchecked:
            text += " The checkpoint's signature was NOT checked (--ignore-signature)."
        return text
    where = "" if result.first_broken_seq is None else f" at seq {result.first_broken_seq}"
    before = "entry" if result.checked == 1 else "entries"
    return f"INVALID{where}: {result.reason} ({result.checked} {before} before it verify)."


def _verify_store(url: str, checkpoint: Checkpoint | None, key: bytes | None) -> VerifyResult:
    with open_shared(url, audit_key=key) as kw:
        try:
            return kw.audit.verify(against=checkpoint)
        except StoreUnavailableError as exc:
            fail(UNAVAILABLE, str(exc))
        except AuditIntegrityError as exc:
            fail(INVALID, f"the stored chain is unusable: {exc}")


# ------------------------------------------------------------------------------- tail
def _tail(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        fail(USAGE, "--interval must be > 0 seconds")
    remote = remote_for(args)
    if remote is not None:
        return _follow(args, partial(_remote_page, remote, args.kind, args.agent))
    with open_shared(args.url) as kw:

        def page(cursor: str | None) -> AuditPage:
            return kw.audit.query(kind=args.kind, agent_id=args.agent, cursor=cursor, limit=_PAGE)

        try:
            return _follow(args, page)
        except InvalidRequestError as exc:
            fail(USAGE, str(exc))
        except StoreUnavailableError as exc:
            fail(UNAVAILABLE, str(exc))


def _remote_page(
    remote: Remote, kind: str | None, agent: str | None, cursor: str | None
) -> AuditPage:
    found = remote.get("/v1/audit", kind=kind, agent_id=agent, cursor=cursor, limit=_PAGE)
    try:
        return AuditPage.model_validate(found)
    except ValidationError:
        fail(UNAVAILABLE, "the server answered something that is not a page of audit entries")


def _follow(args: argparse.Namespace, query: Callable[[str | None], AuditPage]) -> int:
    # Walk to the end, keeping the last N. ``cursor`` stays at the start
    # of the last (partial) page, which --follow re-reads until it fills.
    last: deque[AuditEntry] = deque(maxlen=args.n)
    cursor: str | None = None
    seen = 0
    while True:
        page = query(cursor)
        last.extend(page.entries)
        if page.entries:
            seen = page.entries[-1].seq
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    for entry in last:
        _print_entry(entry, args.json)
    if not args.follow:
        return OK
    try:
        while True:
            time.sleep(args.interval)
            while True:
                page = query(cursor)
                for entry in page.entries:
                    if entry.seq > seen:
                        _print_entry(entry, args.json)
                        seen = entry.seq
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
    except KeyboardInterrupt:
        return OK


def _print_entry(entry: AuditEntry, as_json: bool) -> None:
    if as_json:
        print(entry.model_dump_json(), flush=True)
        return
    when = datetime.fromtimestamp(entry.ts / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    data = json.dumps(entry.data, sort_keys=True, separators=(",", ":"), default=str)
    if len(data) > _DATA_WIDTH:
        data = data[: _DATA_WIDTH - 3] + "..."
    print(
        f"{entry.seq:>6}  {when[:-3]}Z  {entry.kind:18}  {entry.agent_id or '-':20}  {data}",
        flush=True,
    )
