"""``klockwork bus publish | peek | tail | groups | channels``: the event bus from a shell.

Messages print as one JSON object per line (``id``, ``channel``, ``seq``,
``payload``, ``published_at``, ``visible_at``; times in epoch ms), so the
output pipes into ``jq``. ``tail --follow`` keeps printing new messages
until Ctrl-C (exit 0). See :mod:`klockwork.cli` for the exit codes: bad
input (a payload that is not a JSON object, a bad channel name, a bad
option) is 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from klockwork.cli.support import OK, UNAVAILABLE, USAGE, fail, open_shared
from klockwork.core.bus.model import ChannelInfo, GroupInfo, Message
from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError, StoreUnavailableError

__all__ = ["add_parsers", "message_json", "run"]

_URL_HELP = "the shared store (default: $KLOCKWORK_URL); memory:// is refused"
_PAGE = 1000
_T = TypeVar("_T")


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bus`` and its subcommands to the top-level parser."""
    bus = commands.add_parser("bus", help="publish, replay and watch bus channels")
    sub = bus.add_subparsers(dest="bus_command", required=True)

    publish = sub.add_parser("publish", help="publish a JSON object; prints the message")
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("payload", metavar="JSON", help="a JSON object, e.g. '{\"pr\": 42}'")
    publish.add_argument("--key", help="idempotency key: publishing it again publishes nothing")
    publish.add_argument(
        "--deliver-at", type=int, metavar="MS", help="hide the message until this epoch ms"
    )
    publish.add_argument("--url", help=_URL_HELP)

    peek = sub.add_parser("peek", help="print visible messages (JSON lines), consuming nothing")
    peek.add_argument("channel", metavar="CHANNEL")
    peek.add_argument("--after", type=int, default=0, metavar="SEQ", help="only seq > SEQ")
    peek.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (<= 1000)")
    peek.add_argument("--url", help=_URL_HELP)

    tail = sub.add_parser("tail", help="print the last messages of a channel")
    tail.add_argument("channel", metavar="CHANNEL")
    tail.add_argument("-n", type=_count, default=10, metavar="N", help="messages (default 10)")
    tail.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new messages until Ctrl-C"
    )
    tail.add_argument(
        "--interval", type=float, default=0.2, help="seconds between polls with --follow"
    )
    tail.add_argument("--url", help=_URL_HELP)

    groups = sub.add_parser("groups", help="consumer groups: pending, lag and settings")
    groups.add_argument("channel", metavar="CHANNEL", nargs="?", help="only this channel's")
    groups.add_argument("--json", action="store_true", help="a JSON array of groups")
    groups.add_argument("--url", help=_URL_HELP)

    channels = sub.add_parser("channels", help="channels: newest seq, length, groups, retention")
    channels.add_argument("--json", action="store_true", help="a JSON array of channels")
    channels.add_argument("--url", help=_URL_HELP)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``klockwork bus ...``; raises ``CliError`` for a failure."""
    command: Callable[[argparse.Namespace], int] = {
        "publish": _publish,
        "peek": _peek,
        "tail": _tail,
        "groups": _groups,
        "channels": _channels,
    }[args.bus_command]
    return command(args)


def _asking(call: Callable[[], _T]) -> _T:
    """``call()``, its refusals as exit codes."""
    try:
        return call()
    except InvalidRequestError as exc:
        fail(USAGE, str(exc))
    except StoreUnavailableError as exc:
        fail(UNAVAILABLE, str(exc))


def message_json(message: Message) -> str:
    """One message as the one-line JSON object the commands print."""
    return json.dumps(message.to_dict(), ensure_ascii=False)


def _print(message: Message) -> None:
    print(message_json(message), flush=True)


# ---------------------------------------------------------------------------- publish
def _payload(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        fail(USAGE, f"JSON: not valid JSON ({exc}); pass an object, e.g. '{{\"pr\": 42}}'")
    if not isinstance(value, dict):
        fail(USAGE, f"JSON: the payload must be a JSON object, got {type(value).__name__}")
    return value


def _publish(args: argparse.Namespace) -> int:
    payload = _payload(args.payload)
    with open_shared(args.url) as kw:
        message = _asking(
            lambda: kw.bus.publish(args.channel, payload, deliver_at=args.deliver_at, key=args.key),
        )
    _print(message)
    return OK


# ------------------------------------------------------------------------------- peek
def _peek(args: argparse.Namespace) -> int:
    with open_shared(args.url) as kw:
        messages = _asking(lambda: kw.bus.peek(args.channel, args.after, args.limit))
    for message in messages:
        _print(message)
    return OK


# ------------------------------------------------------------------------------- tail
def _last(kw: Klockwork, channel: str, n: int) -> tuple[list[Message], int]:
    """The last ``n`` visible messages, and the seq to follow from."""
    kw.bus.peek(channel, 0, 1)  # a bad channel name is refused before anything else
    info = [c for c in kw.bus.channels() if c.channel == channel]
    last_seq = info[0].last_seq if info else 0
    if n == 0:
        return [], last_seq
    start = max(0, last_seq - n)
    if n <= _PAGE:  # the last n seqs; all of them when the channel holds no more
        window = kw.bus.peek(channel, start, n)
        if len(window) == n or start == 0:
            return window, window[-1].seq if window else start
    # Delayed messages hide in the window, or n is large: walk the channel.
    last: deque[Message] = deque(maxlen=n)
    cursor = 0
    while True:
        page = kw.bus.peek(channel, cursor, _PAGE)
        last.extend(page)
        if len(page) < _PAGE:
            break
        cursor = page[-1].seq
    return list(last), last[-1].seq if last else 0


def _tail(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        fail(USAGE, "--interval must be > 0 seconds")
    try:
        with open_shared(args.url) as kw:
            messages, cursor = _asking(lambda: _last(kw, args.channel, args.n))
            for message in messages:
                _print(message)
            while args.follow:
                time.sleep(args.interval)
                while True:
                    page = _asking(partial(kw.bus.peek, args.channel, cursor, _PAGE))
                    for message in page:
                        _print(message)
                        cursor = message.seq
                    if len(page) < _PAGE:
                        break
    except KeyboardInterrupt:  # Ctrl-C ends a follow: a normal end
        return OK
    return OK


# ----------------------------------------------------------------------- groups, channels
def _groups(args: argparse.Namespace) -> int:
    with open_shared(args.url) as kw:
        groups = _asking(lambda: kw.bus.groups(args.channel))
    if args.json:
        print(json.dumps([_group_fields(g) for g in groups]))
        return OK
    if not groups:
        print("no groups" if args.channel is None else f"no groups on {args.channel}")
        return OK
    rows = [("CHANNEL", "GROUP", "PENDING", "LAG", "VISIBILITY", "MAX DELIVERIES")]
    rows += [
        (
            g.channel,
            g.group,
            str(g.pending),
            str(g.lag),
            f"{g.visibility_timeout_s:g} s",
            str(g.max_deliveries),
        )
        for g in groups
    ]
    _table(rows)
    return OK


def _group_fields(group: GroupInfo) -> dict[str, Any]:
    return {
        "channel": group.channel,
        "group": group.group,
        "pending": group.pending,
        "lag": group.lag,
        "visibility_timeout_s": group.visibility_timeout_s,
        "max_deliveries": group.max_deliveries,
        "created_at": group.created_at,
    }


def _channels(args: argparse.Namespace) -> int:
    with open_shared(args.url) as kw:
        channels = _asking(kw.bus.channels)
    if args.json:
        print(json.dumps([_channel_fields(c) for c in channels]))
        return OK
    if not channels:
        print("no channels")
        return OK
    rows = [("CHANNEL", "LAST SEQ", "LENGTH", "MAX LEN", "MAX AGE", "GROUPS")]
    rows += [
        (
            c.channel,
            str(c.last_seq),
            str(c.length),
            str(c.max_len),
            "-" if c.max_age_s is None else f"{c.max_age_s:g} s",
            ",".join(c.groups) or "-",
        )
        for c in channels
    ]
    _table(rows)
    return OK


def _channel_fields(channel: ChannelInfo) -> dict[str, Any]:
    return {
        "channel": channel.channel,
        "last_seq": channel.last_seq,
        "length": channel.length,
        "groups": list(channel.groups),
        "max_len": channel.max_len,
        "max_age_s": channel.max_age_s,
    }


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
