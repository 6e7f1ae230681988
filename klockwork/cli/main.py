"""The ``klockwork`` command line.

    klockwork leases [--url URL | --server URL] [--agent ID] [--resource KEY] [--json]
    klockwork approvals list [--url URL | --server URL]
                             [--status pending|approved|denied|expired|all] [--json]
    klockwork approvals approve ID [--approver NAME | --server URL] [--comment TEXT]
                                   [--url URL] [--json]
    klockwork approvals deny ID [--approver NAME | --server URL] [--reason TEXT] [--url URL]
                                [--json]
    klockwork audit verify FILE|URL [--checkpoint FILE [--key-env VAR | --ignore-signature]]
                           [--json]
    klockwork audit tail [--url URL | --server URL] [-n N] [--kind K] [--agent ID] [--follow]
                         [--json]
    klockwork bus publish CHANNEL JSON [--key K] [--deliver-at MS] [--url URL]
    klockwork bus peek CHANNEL [--after SEQ] [--limit N] [--url URL]
    klockwork bus tail CHANNEL [-n N] [--follow] [--url URL]
    klockwork bus groups [CHANNEL] [--json] [--url URL]
    klockwork bus channels [--json] [--url URL]
    klockwork serve --url URL [--host 127.0.0.1] [--port 8765] [--policies FILE]
                    [--audit-key-env VAR] [--secure-cookies] [--log-level LEVEL]
    klockwork keys create PRINCIPAL --role agent|approver|admin [--owner PERSON]
                          [--label TEXT] [--url URL] [--json]
    klockwork keys list [--all] [--json] [--url URL]
    klockwork keys revoke KEY_ID [--json] [--url URL]

``--server URL`` (or ``$KLOCKWORK_SERVER``) asks a running ``klockwork
serve`` instead of opening the store, signed in with ``$KLOCKWORK_API_KEY``
(or ``--api-key``); a vote is then cast as the key's principal, and
``--approver`` is refused. See :mod:`klockwork.cli.remote`.

Exit codes a script can rely on:

    0  done: the chain verifies; the vote was counted (a retried vote that
       already counted is also 0); the server was stopped (Ctrl-C, SIGTERM)
    1  refused or invalid: the audit chain does not verify; the approver may
       not decide this approval (the requester, a delegate of it, not among
       the policy's approvers, or already voted the other way); the approval
       is already decided or expired; with ``--server``, the server refused
       (401 an unknown or revoked key, 403 its role may not, 409 already
       decided, 410 a lease that ended, 429 too many failed sign-ins). Why
       is printed on stderr.
    2  bad usage or input: unknown option, unreadable file, no approver
       (``--approver`` or ``$KLOCKWORK_APPROVER``), an unknown approval id,
       no store URL (``--url`` or ``$KLOCKWORK_URL``), ``memory://`` or a
       SQLite file that does not exist (every command but ``serve`` and
       ``keys create`` reads a shared store), a signed checkpoint without
       ``--key-env`` (or ``--ignore-signature``), a bus payload that is not
       a JSON object, a bad channel name, a bad role or an unknown key id;
       ``--server`` with ``--url``, or without a key, or with
       ``--approver``; the server said 404 or 422; ``serve`` on a host
       that is not loopback while the store has no active API key, or
       without the ``server`` extra (``pip install 'klockwork[server]'``)
    3  the store could not answer; the server did not answer (or answered
       5xx, or something that is not its API); ``serve`` could not listen
       on its address (in use)

An unknown approval id is 2, not 1: 1 means "the store answered and said
no" (retrying will not help, but the request was well-formed); 2 means the
request itself was wrong (a typo'd id, a different store).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from klockwork.cli import approvals, audit, bus, keys, leases, serve
from klockwork.cli.support import INVALID, OK, UNAVAILABLE, USAGE, CliError, report

__all__ = ["INVALID", "OK", "UNAVAILABLE", "USAGE", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klockwork",
        description=(
            "Inspect leases, decide approvals, verify or tail audit trails, use the bus, "
            "and run the HTTP API (serve) with its keys."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    leases.add_parsers(commands)
    approvals.add_parsers(commands)
    audit.add_parsers(commands)
    bus.add_parsers(commands)
    serve.add_parsers(commands)
    keys.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "leases":
            return leases.run(args)
        if args.command == "approvals":
            return approvals.run(args)
        if args.command == "bus":
            return bus.run(args)
        if args.command == "serve":
            return serve.run(args)
        if args.command == "keys":
            return keys.run(args)
        return audit.run(args)
    except CliError as error:
        return report(error)
    except KeyboardInterrupt:
        # Ctrl-C is how a --follow ends, even when it lands while the
        # command closes its store: a normal end, not a traceback.
        if getattr(args, "follow", False):
            return OK
        raise
    except BrokenPipeError:
        # The reader went away (`klockwork audit tail -f | head`): that is a
        # normal end, not a crash. Point stdout at devnull so the interpreter's
        # final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
