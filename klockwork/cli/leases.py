"""``klockwork leases``: who holds what in a shared store, until when."""

from __future__ import annotations

import argparse
import json

from klockwork.cli.support import OK, UNAVAILABLE, USAGE, fail, open_shared
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError

__all__ = ["add_parsers", "run"]


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``leases`` to the top-level parser."""
    leases = commands.add_parser("leases", help="list active leases")
    leases.add_argument("--url", help="the shared store (default: $KLOCKWORK_URL)")
    leases.add_argument("--agent", help="only this agent's leases")
    leases.add_argument("--resource", help="only leases overlapping this TYPE:path key")
    leases.add_argument("--json", action="store_true", help="a JSON array of leases")


def run(args: argparse.Namespace) -> int:
    """Run ``klockwork leases``; raises ``CliError`` for a failure."""
    kw = open_shared(args.url)  # never a new, empty store that says "no active leases"
    try:
        held = kw.leases.list(agent_id=args.agent, resource=args.resource)
    except InvalidRequestError as exc:
        fail(USAGE, str(exc))
    except StoreUnavailableError as exc:
        fail(UNAVAILABLE, str(exc))
    finally:
        kw.close()
    if args.json:  # one JSON array, [] when empty
        print(json.dumps([lease.model_dump(mode="json") for lease in held]))
        return OK
    if not held:
        print("no active leases")
        return OK
    now = kw.clock.now_ms()
    print(f"{'RESOURCE':40} {'PREDICATE':10} {'AGENT':20} {'SESSION':24} {'TOKEN':>6} EXPIRES")
    for lease in held:
        left = max(0, lease.expires_at - now) / 1000
        print(
            f"{lease.resource:40} {lease.predicate.value:10} {lease.agent_id:20} "
            f"{lease.session_id:24} {lease.fencing_token:>6} in {left:.1f} s"
        )
    return OK
