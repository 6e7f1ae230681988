"""``klockwork keys create | list | revoke``: the API keys ``klockwork serve`` signs in with.

Keys live in the store (see :mod:`klockwork.server.keys`), so these commands
open the shared store, not the server, and work while it runs: a new key
signs in at once, a revoked one is refused from the next request on. They
import no web framework, so they work without the ``server`` extra.

``create`` prints the key alone on stdout (``KEY=$(klockwork keys create
...)`` captures it) and what it is on stderr; the key is shown this once and
never again (the store keeps only its hash). See :mod:`klockwork.cli` for
the exit codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from klockwork.cli.support import OK, UNAVAILABLE, USAGE, fail, open_shared
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError
from klockwork.server.keys import ROLES, ApiKey, ApiKeys

__all__ = ["add_parsers", "run"]

_URL_HELP = "the shared store (default: $KLOCKWORK_URL); memory:// is refused"


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys`` and its subcommands to the top-level parser."""
    keys = commands.add_parser("keys", help="create, list or revoke the server's API keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", help="create a key; prints it once")
    create.add_argument(
        "principal", metavar="PRINCIPAL", help="who the key speaks for: an agent id or a person"
    )
    create.add_argument(
        "--role",
        choices=ROLES,
        required=True,
        help="agent: acts as that agent only; approver: decides approvals; admin: everything",
    )
    create.add_argument(
        "--owner", metavar="PERSON", help="an agent key's owner: may not approve its requests"
    )
    create.add_argument("--label", default="", help="free text, e.g. where the key is used")
    create.add_argument(
        "--url", help="the store (default: $KLOCKWORK_URL); a new SQLite file is created"
    )
    create.add_argument(
        "--json", action="store_true", help='print {"api_key": ..., "key": {...}} on stdout'
    )

    listing = sub.add_parser("list", help="list keys (never the key itself)")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    listing.add_argument("--json", action="store_true", help="a JSON array of keys")
    listing.add_argument("--url", help=_URL_HELP)

    revoke = sub.add_parser("revoke", help="revoke a key: refused from the next request on")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id (see keys list)")
    revoke.add_argument("--json", action="store_true", help="print the key's facts as JSON")
    revoke.add_argument("--url", help=_URL_HELP)


def run(args: argparse.Namespace) -> int:
    """Run ``klockwork keys ...``; raises ``CliError`` for a failure."""
    if args.keys_command == "create":
        return _create(args)
    if args.keys_command == "list":
        return _list(args)
    return _revoke(args)


def _create(args: argparse.Namespace) -> int:
    # The one command that may make a new SQLite file: keys are set up before
    # a server's first start (a non-loopback bind refuses to start without one).
    with open_shared(args.url, create=True) as kw:
        try:
            record, secret = ApiKeys(kw).create(
                args.principal, args.role, owner=args.owner, label=args.label
            )
        except InvalidRequestError as exc:
            fail(USAGE, str(exc))
        except StoreUnavailableError as exc:
            fail(UNAVAILABLE, str(exc))
    if args.json:
        facts = record.public().model_dump(mode="json")
        print(json.dumps({"api_key": secret, "key": facts}))
        return OK
    owner = f", owner {record.owner}" if record.owner else ""
    print(
        f"klockwork: created key {record.key_id} for {record.principal!r} "
        f"(role {record.role}{owner}); it is shown only this once:",
        file=sys.stderr,
    )
    print(secret, flush=True)
    return OK


def _list(args: argparse.Namespace) -> int:
    with open_shared(args.url) as kw:
        try:
            found = ApiKeys(kw).list(include_revoked=args.all)
        except StoreUnavailableError as exc:
            fail(UNAVAILABLE, str(exc))
    if args.json:  # one JSON array, [] when empty
        print(json.dumps([k.public().model_dump(mode="json") for k in found]))
        return OK
    if not found:
        print("no keys" if args.all else "no active keys")
        return OK
    rows = [("KEY_ID", "PRINCIPAL", "ROLE", "OWNER", "STATUS", "CREATED", "LABEL")]
    rows += [_row(k) for k in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return OK


def _row(key: ApiKey) -> tuple[str, str, str, str, str, str, str]:
    created = datetime.fromtimestamp(key.created_at_ms / 1000, tz=timezone.utc)
    return (
        key.key_id,
        key.principal,
        key.role,
        key.owner or "-",
        key.status,
        created.strftime("%Y-%m-%d %H:%M") + "Z",
        key.label,
    )


def _revoke(args: argparse.Namespace) -> int:
    with open_shared(args.url) as kw:
        keys = ApiKeys(kw)
        try:
            before = keys.get(args.key_id)
            if before is None:
                fail(USAGE, f"no key {args.key_id!r} in this store (see `klockwork keys list`)")
            record = keys.revoke(args.key_id)
        except InvalidRequestError as exc:
            fail(USAGE, str(exc))
        except StoreUnavailableError as exc:
            fail(UNAVAILABLE, str(exc))
    if args.json:
        print(record.public().model_dump_json())
        return OK
    was = "was already revoked" if before.status == "revoked" else "is revoked"
    print(f"key {record.key_id} ({record.principal!r}, role {record.role}) {was}")
    return OK
