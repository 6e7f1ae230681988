"""What the bus hands out (messages, deliveries, await results) and what it accepts.

Messages and deliveries are named tuples: built on the message hot path,
they cost a fraction of a pydantic model (or of a frozen dataclass), are
immutable, and still validate and serialise through pydantic
(``TypeAdapter(Message)``). Payloads are stored as JSON
text and decoded for each reader, so one consumer changing the dict it got
never changes what another consumer, or a redelivery, sees.

May import: the ground floor only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, get_type_hints

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from klockwork.core.errors import InvalidRequestError
from klockwork.core.validation import check_json_object, check_key

__all__ = [
    "AWAIT_MODES",
    "DEAD_SUFFIX",
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_DELIVERIES",
    "DEFAULT_MAX_LEN",
    "DEFAULT_VISIBILITY_TIMEOUT_S",
    "EVENTS_CHANNEL",
    "EVENT_KINDS",
    "MAX_CHANNEL_CHARS",
    "MAX_PAYLOAD_BYTES",
    "AwaitMode",
    "AwaitResult",
    "ChannelInfo",
    "Delivery",
    "GroupInfo",
    "Message",
    "channel_list",
    "check_channel",
    "check_dedup_key",
    "check_group_name",
    "decode_payload",
    "encode_payload",
    "encode_trusted",
    "to_epoch_ms",
]

#: Where the engine publishes its governance events.
EVENTS_CHANNEL = "klockwork.events"
#: The kinds of governance event published there (``payload["kind"]``).
EVENT_KINDS: tuple[str, ...] = (
    "lease.granted",
    "lease.denied",
    "lease.released",
    "lease.expired",
    "lease.revoked",
    "action.executed",
    "action.requested",
    "action.denied",
    "approval.requested",
    "approval.decided",
    "approval.expired",
    "delegation.created",
    "delegation.revoked",
    "breaker.opened",
)
#: Appended to a channel's name for its dead letters.
DEAD_SUFFIX = ".dead"
#: The longest channel name a caller may use (its dead-letter channel may be longer).
MAX_CHANNEL_CHARS = 200
#: The largest payload, as JSON text: a bus carries messages, not files.
MAX_PAYLOAD_BYTES = 1 << 20
#: Group defaults (DESIGN "Event bus").
DEFAULT_VISIBILITY_TIMEOUT_S = 30.0
DEFAULT_MAX_DELIVERIES = 5
#: Channel retention defaults: a long-running process stays bounded.
DEFAULT_MAX_LEN = 10_000
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0

AwaitMode = Literal["any", "all", "at_least"]
AWAIT_MODES: tuple[str, ...] = ("any", "all", "at_least")

_MAX_NAME_CHARS = 1000  # a channel name with its dead-letter suffixes
_CHANNEL = re.compile(r"[A-Za-z0-9_.:\-]+")

_dumps: Callable[[Any], bytes]
_loads: Callable[[bytes | str], Any]
try:  # orjson is a dependency on CPython; json (same output for JSON data) elsewhere
    from orjson import dumps as _dumps
    from orjson import loads as _loads
except ImportError:  # pragma: no cover

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads


class Message(NamedTuple):
    """One published message.

    Attributes:
        id: unique across channels; what :meth:`Bus.ack` takes.
        channel: where it was published.
        seq: its position in the channel, strictly increasing from 1.
        payload: the JSON object published (a fresh copy for each reader).
        published_at: epoch ms.
        visible_at: epoch ms from which subscribers and peek see it
            (``deliver_at``; ``published_at`` when not delayed).
    """

    id: str
    channel: str
    seq: int
    payload: dict[str, Any]
    published_at: int
    visible_at: int

    def to_dict(self) -> dict[str, Any]:
        """The message as a JSON-ready dict (its fields by name)."""
        return self._asdict()

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return _object_schema(cls, handler)


class Delivery(NamedTuple):
    """A message handed to one consumer of a group.

    Attributes:
        message: what was delivered.
        attempt: 1 on the first delivery, +1 on each redelivery.
        delivered_at: epoch ms.
        consumer: who it was delivered to.
        group: the consumer group.
    """

    message: Message
    attempt: int
    delivered_at: int
    consumer: str
    group: str

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return _object_schema(cls, handler)

    @property
    def id(self) -> str:
        """The message id (ack with it)."""
        return self.message.id

    @property
    def payload(self) -> dict[str, Any]:
        """The message payload."""
        return self.message.payload


@dataclass(frozen=True, slots=True)
class AwaitResult:
    """What :meth:`Bus.await_channels` saw.

    Attributes:
        satisfied: the mode's condition held before the wait ran out.
        timed_out: the wait ran out first (then nothing was consumed).
        messages: channel → the messages seen there (every awaited channel
            has an entry, possibly empty).
    """

    satisfied: bool
    timed_out: bool
    messages: dict[str, list[Message]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """How many messages in all."""
        return sum(len(v) for v in self.messages.values())


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A consumer group and where it stands.

    Attributes:
        pending: deliveries not yet acked (in flight or waiting to be redelivered).
        lag: visible messages the group has not been handed yet.
    """

    channel: str
    group: str
    visibility_timeout_s: float
    max_deliveries: int
    created_at: int
    pending: int = 0
    lag: int = 0


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """A channel: its newest seq, how many messages it retains, its groups and retention."""

    channel: str
    last_seq: int
    length: int
    groups: tuple[str, ...]
    max_len: int
    max_age_s: float | None


def _object_schema(cls: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
    """Pydantic sees a named tuple of ours as an object: serialised by field name,
    validated from an instance or from a mapping of its fields (a named tuple
    would otherwise be a JSON array)."""
    fields = core_schema.typed_dict_schema(
        {
            name: core_schema.typed_dict_field(handler.generate_schema(tp))
            for name, tp in get_type_hints(cls).items()
        }
    )
    from_fields = core_schema.no_info_after_validator_function(lambda d: cls(**d), fields)
    return core_schema.json_or_python_schema(
        json_schema=from_fields,
        python_schema=core_schema.union_schema([core_schema.is_instance_schema(cls), from_fields]),
        serialization=core_schema.plain_serializer_function_ser_schema(
            lambda value: value._asdict(), return_schema=fields
        ),
    )


def check_channel(value: object, argument: str = "channel") -> str:
    """``value`` if it is a channel name: ``[A-Za-z0-9_.:-]``, 1-200 characters.

    Trailing ``.dead`` suffixes do not count towards the 200: the dead
    letters of any valid channel (``<channel>.dead``, and theirs) can be read.
    """
    if not isinstance(value, str) or not _CHANNEL.fullmatch(value):
        raise InvalidRequestError(
            argument, value, "a channel name is 1-200 characters of A-Z a-z 0-9 _ . : -"
        )
    base = value
    while base.endswith(DEAD_SUFFIX) and len(base) > len(DEAD_SUFFIX):
        base = base[: -len(DEAD_SUFFIX)]
    if len(base) > MAX_CHANNEL_CHARS or len(value) > _MAX_NAME_CHARS:
        raise InvalidRequestError(argument, value, f"longer than {MAX_CHANNEL_CHARS} characters")
    return value


def channel_list(channels: object) -> list[str]:
    """``channels`` as a list of distinct, valid channel names (at least one)."""
    if isinstance(channels, str) or not isinstance(channels, Iterable):
        raise InvalidRequestError("channels", channels, "expected a list of channel names")
    names = [check_channel(c, "channels") for c in channels]
    if not names:
        raise InvalidRequestError("channels", channels, "name at least one channel")
    if len(set(names)) != len(names):
        raise InvalidRequestError("channels", channels, "names a channel twice")
    return names


def check_group_name(value: object, argument: str) -> str:
    """A group or consumer name: the channel name alphabet, 1-200 characters."""
    if not isinstance(value, str) or not _CHANNEL.fullmatch(value) or len(value) > 200:
        raise InvalidRequestError(
            argument, value, "expected 1-200 characters of A-Z a-z 0-9 _ . : -"
        )
    return value


def encode_payload(payload: object, argument: str = "payload") -> bytes:
    """``payload`` as compact JSON bytes, if it is a JSON object of at most 1 MiB.

    Fast path: encode, decode, compare — JSON data survives the round trip
    unchanged, while what JSON cannot hold exactly (NaN, a UUID, a set, a
    datetime) fails it. Only then is the payload walked, to accept what
    merely changes shape (a tuple becomes a list) or name the problem.
    """
    text = b""
    try:
        same = payload.__class__ is dict and _loads(text := _dumps(payload)) == payload
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        same = False
    if not same:
        check_json_object(payload, argument)
        try:
            text = _dumps(payload)
        except TypeError as exc:  # an int beyond 64 bits: JSON readers would round it
            raise InvalidRequestError(
                argument, payload, f"cannot be stored as JSON: {exc}"
            ) from None
    if len(text) > MAX_PAYLOAD_BYTES:
        raise InvalidRequestError(
            argument, f"<{len(text)} bytes>", f"larger than {MAX_PAYLOAD_BYTES} bytes of JSON"
        )
    return text


decode_payload: Callable[[bytes | str], Any] = _loads


def encode_trusted(value: dict[str, Any]) -> bytes:
    """JSON bytes of data klockwork built itself from checked parts (no size limit).

    A dead letter wraps a payload that was at most :data:`MAX_PAYLOAD_BYTES`
    with a few hundred bytes of its own: refusing it would leave the
    message neither delivered nor dead.
    """
    return _dumps(value)


def to_epoch_ms(value: object, argument: str) -> int:
    """An epoch-ms int, or an aware ``datetime``, as epoch ms."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidRequestError(argument, value, "a datetime must be timezone-aware")
        return int(value.timestamp() * 1000)
    if not isinstance(value, int) or value.__class__ is bool or not 0 <= value < 2**53:
        raise InvalidRequestError(
            argument, value, "expected epoch milliseconds (an int) or an aware datetime"
        )
    return value


def check_dedup_key(value: object) -> str:
    """An idempotency key: non-empty storable text."""
    return check_key(value, "key")
