"""Paging through audit query results: the page model and its opaque cursor."""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict

from klockwork.core.audit.chain import AuditEntry
from klockwork.core.errors import InvalidRequestError

__all__ = ["MAX_QUERY_LIMIT", "AuditPage", "decode_cursor", "encode_cursor"]

#: The largest page :meth:`~klockwork.core.audit.log.AuditLog.query` returns.
MAX_QUERY_LIMIT = 1000
_CURSOR_PREFIX = "kwa1:"


class AuditPage(BaseModel):
    """One page of :meth:`AuditLog.query` results.

    Attributes:
        entries: matching entries, oldest first.
        next_cursor: pass as ``cursor=`` to get the next page; None on the last page.
    """

    model_config = ConfigDict(frozen=True)
    entries: list[AuditEntry]
    next_cursor: str | None


def encode_cursor(seq: int) -> str:
    """The cursor of the page that starts after entry ``seq``."""
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq a cursor of :func:`encode_cursor` starts after; a bad one is refused, typed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw.startswith(_CURSOR_PREFIX):
            seq = int(raw[len(_CURSOR_PREFIX) :])
            if seq >= 0:
                return seq
    except (ValueError, binascii.Error, UnicodeDecodeError, TypeError):
        pass
    raise InvalidRequestError("cursor", cursor, "not a cursor returned by query()")
