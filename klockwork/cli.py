"""The ``klockwork`` command line.

    klockwork leases [--url URL] [--agent ID] [--resource KEY] [--json]
    klockwork audit verify FILE [--checkpoint FILE] [--key-env VAR] [--json]

Exit codes a script can rely on: 0 success (the chain verifies), 1 the
audit chain does not verify, 2 bad usage or unreadable input, 3 the store
could not answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from klockwork.core.audit import verify_file
from klockwork.core.audit_chain import Checkpoint
from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError

__all__ = ["main"]

OK, INVALID, USAGE, UNAVAILABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klockwork", description="Inspect klockwork leases and verify audit trails."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    leases = commands.add_parser("leases", help="list active leases")
    leases.add_argument(
        "--url", help="store URL (default: $KLOCKWORK_URL, else an empty in-memory store)"
    )
    leases.add_argument("--agent", help="only this agent's leases")
    leases.add_argument("--resource", help="only leases overlapping this TYPE:path key")
    leases.add_argument("--json", action="store_true", help="one JSON object per lease")

    audit = commands.add_parser("audit", help="audit trail tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="verify an exported JSONL audit file")
    verify.add_argument("file", help="a file written by kw.audit.export(path)")
    verify.add_argument(
        "--checkpoint", help="a JSON checkpoint (kw.audit.checkpoint()) to catch truncation"
    )
    verify.add_argument(
        "--key-env",
        metavar="VAR",
        help="environment variable holding the HMAC key that signed the checkpoint",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)
    if args.command == "leases":
        return _leases(args)
    return _audit_verify(args)


def _leases(args: argparse.Namespace) -> int:
    try:
        kw = Klockwork.open(args.url)
    except InvalidRequestError as exc:
        print(f"klockwork: {exc}", file=sys.stderr)
        return USAGE
    except StoreUnavailableError as exc:
        print(f"klockwork: {exc}", file=sys.stderr)
        return UNAVAILABLE
    try:
        leases = kw.leases.list(agent_id=args.agent, resource=args.resource)
    except InvalidRequestError as exc:
        print(f"klockwork: {exc}", file=sys.stderr)
        return USAGE
    except StoreUnavailableError as exc:
        print(f"klockwork: {exc}", file=sys.stderr)
        return UNAVAILABLE
    finally:
        kw.close()
    if args.json:
        for lease in leases:
            print(lease.model_dump_json())
        return OK
    if not leases:
        print("no active leases")
        return OK
    now = kw.clock.now_ms()
    print(f"{'RESOURCE':40} {'PREDICATE':10} {'AGENT':20} {'SESSION':24} {'TOKEN':>6} EXPIRES")
    for lease in leases:
        left = max(0, lease.expires_at - now) / 1000
        print(
            f"{lease.resource:40} {lease.predicate.value:10} {lease.agent_id:20} "
            f"{lease.session_id:24} {lease.fencing_token:>6} in {left:.1f} s"
        )
    return OK


def _audit_verify(args: argparse.Namespace) -> int:
    if "://" in args.file:
        print(
            "klockwork: verifying a store URL needs the engine's audit wiring; "
            "export the trail (kw.audit.export(path)) and verify the file",
            file=sys.stderr,
        )
        return USAGE
    key: bytes | None = None
    if args.key_env:
        value = os.environ.get(args.key_env)
        if not value:
            print(f"klockwork: ${args.key_env} is not set", file=sys.stderr)
            return USAGE
        key = value.encode()
    checkpoint: Checkpoint | None = None
    try:
        if args.checkpoint:
            with open(args.checkpoint, encoding="utf-8") as f:
                checkpoint = Checkpoint.model_validate_json(f.read())
        result = verify_file(args.file, against=checkpoint, key=key)
    except (OSError, ValidationError) as exc:
        print(f"klockwork: cannot read input: {exc}", file=sys.stderr)
        return USAGE
    if args.json:
        print(result.model_dump_json())
    else:
        state = "valid" if result.valid else "INVALID"
        broken = "" if result.first_broken_seq is None else f" at seq {result.first_broken_seq}"
        print(f"{state}: {result.checked} entries checked{broken}. {result.reason}")
    return OK if result.valid else INVALID


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
