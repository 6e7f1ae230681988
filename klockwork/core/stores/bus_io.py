"""What the memory and SQLite bus primitives share: dead-letter bytes, errors, channel stats."""

from __future__ import annotations

from collections.abc import Sequence

from klockwork.core.bus.model import ChannelInfo, decode_payload, encode_trusted
from klockwork.core.bus.rules import dead_letter_payload
from klockwork.core.errors import InvalidRequestError
from klockwork.core.stores.bus_base import Retention, StoredMessage

__all__ = ["channel_info", "dead_letter_bytes", "message_dict", "unknown_group"]


def message_dict(msg: StoredMessage) -> dict[str, object]:
    """``msg`` as the JSON object a dead letter carries."""
    return {
        "id": msg.id,
        "channel": msg.channel,
        "seq": msg.seq,
        "payload": decode_payload(msg.payload),
        "published_at": msg.published_at,
        "visible_at": msg.visible_at,
    }


def dead_letter_bytes(
    msg: StoredMessage, group: str, attempts: int, consumer: str | None, last_error: str | None
) -> bytes:
    """The payload (JSON bytes) of ``msg``'s dead letter for ``group``."""
    payload = dead_letter_payload(message_dict(msg), group, attempts, consumer, last_error)
    return encode_trusted(payload)  # the original passed the size check; its wrapping may not


def unknown_group(channel: str, group: str) -> InvalidRequestError:
    """The error for an ack/nack naming a group the channel does not have."""
    return InvalidRequestError(
        "group", group, f"channel {channel!r} has no consumer group {group!r} (subscribe first)"
    )


def channel_info(
    name: str, last_seq: int, length: int, groups: Sequence[str], retention: Retention
) -> ChannelInfo:
    """A :class:`ChannelInfo` with its retention in seconds."""
    max_age = None if retention.max_age_ms is None else retention.max_age_ms / 1000
    return ChannelInfo(name, last_seq, length, tuple(groups), retention.max_len, max_age)
