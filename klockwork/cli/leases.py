"""``klockwork leases``: who holds what in a shared store (or a server's), until when."""

from __future__ import annotations

import argparse
import json
import time

from pydantic import ValidationError

from klockwork.cli.remote import Remote, add_server_options, remote_for
from klockwork.cli.support import OK, UNAVAILABLE, USAGE, fail, open_shared
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError
from klockwork.core.model import Lease

__all__ = ["add_parsers", "run"]


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``leases`` to the top-level parser."""
    leases = commands.add_parser("leases", help="list active leases")
    leases.add_argument("--url", help="the shared store (default: $KLOCKWORK_URL)")
    leases.add_argument("--agent", help="only this agent's leases")
    leases.add_argument("--resource", help="only leases overlapping this TYPE:path key")
    leases.add_argument("--json", action="store_true", help="a JSON array of leases")
    add_server_options(leases)


def run(args: argparse.Namespace) -> int:
    """Run ``klockwork leases``; raises ``CliError`` for a failure."""
    remote = remote_for(args)
    if remote is not None:
        held, now = _list_remote(remote, args.agent, args.resource), int(time.time() * 1000)
    else:
        kw = open_shared(args.url)  # never a new, empty store that says "no active leases"
        try:
            held = kw.leases.list(agent_id=args.agent, resource=args.resource)
        except InvalidRequestError as exc:
            fail(USAGE, str(exc))
        except StoreUnavailableError as exc:
            fail(UNAVAILABLE, str(exc))
        finally:
            kw.close()
        now = kw.clock.now_ms()
    if args.json:  # one JSON array, [] when empty
        print(json.dumps([lease.model_dump(mode="json") for lease in held]))
        return OK
    if not held:
        print("no active leases")
        return OK
    print(f"{'RESOURCE':40} {'PREDICATE':10} {'AGENT':20} {'SESSION':24} {'TOKEN':>6} EXPIRES")
    for lease in held:
        left = max(0, lease.expires_at - now) / 1000
        print(
            f"{lease.resource:40} {lease.predicate.value:10} {lease.agent_id:20} "
            f"{lease.session_id:24} {lease.fencing_token:>6} in {left:.1f} s"
        )
    return OK


def _list_remote(remote: Remote, agent: str | None, resource: str | None) -> list[Lease]:
    found = remote.get("/v1/leases", agent_id=agent, resource=resource)
    try:
        if not isinstance(found, list):
            raise TypeError("not a list")
        return [Lease.model_validate(item) for item in found]
    except (TypeError, ValidationError):
        fail(UNAVAILABLE, "the server answered something that is not a list of leases")
