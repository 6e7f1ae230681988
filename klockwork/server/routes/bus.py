"""The event bus over HTTP: publish, subscribe (long poll), ack, nack, peek, channels, groups.

Agents (and admins) publish and consume; anyone with a key may look
(``peek``, ``channels``, ``groups``). A consumer is who took a delivery,
so an agent key's consumer names are its own: ``worker-1`` asked by the
key of agent ``builder`` is the consumer ``builder:worker-1`` (a consumer
name sent over HTTP has no ``:``, so no agent can make a name of another
agent's). Groups are shared on purpose (workers split a group's messages).

``klockwork.events`` carries the engine's governance events: nobody
publishes there over HTTP (a forged ``approval.decided`` would mislead
whoever follows them), and an agent key may not read it (it tells of every
agent's actions; approvers and admins follow it, see ``/v1/events/stream``).
Refusals are audited as ``access.denied``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from klockwork.core.bus.model import (
    EVENTS_CHANNEL,
    MAX_CHANNEL_CHARS,
    ChannelInfo,
    Delivery,
    GroupInfo,
    Message,
)
from klockwork.core.validation import MAX_KEY_CHARS, MAX_TEXT_CHARS
from klockwork.server.context import Server
from klockwork.server.errors import COMMON_REFUSALS, refusals
from klockwork.server.keys import ApiKey
from klockwork.server.routes.leases import unless_disconnected

__all__ = ["Ack", "Acked", "Nack", "Nacked", "Publish", "SubscribeBase", "consumer_of", "router"]

#: The largest batch one subscribe, ack or nack takes over HTTP.
MAX_BATCH = 100
_NAME = r"^[A-Za-z0-9_.:\-]+$"
# A consumer name sent over HTTP: the name alphabet without ':', which
# separates an agent's principal from its consumer names.
_CONSUMER = r"^[A-Za-z0-9_.\-]+$"
_PRINCIPAL = re.compile(r"[A-Za-z0-9_.:\-]{1,120}")
# Dead-letter channels may be a few ".dead" longer than a channel.
_CHANNEL_CHARS = MAX_CHANNEL_CHARS + 50


def _channel() -> Any:
    return Path(max_length=_CHANNEL_CHARS, pattern=_NAME, description="the channel's name")


def _group() -> Any:
    return Field(min_length=1, max_length=200, pattern=_NAME)


class Publish(BaseModel):
    """A message to publish: a JSON object, an optional idempotency key and delivery time."""

    payload: dict[str, Any]
    key: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_KEY_CHARS,
        description="publishing this key again on the channel returns the original message",
    )
    deliver_at: int | None = Field(
        default=None,
        strict=True,
        ge=0,
        lt=2**53,
        description="epoch ms: hidden from readers until then",
    )


class SubscribeBase(BaseModel):
    """A read through a consumer group: at most ``max_messages``, waiting up to ``wait_s``."""

    group: str = _group()
    consumer: str = Field(min_length=1, max_length=64, pattern=_CONSUMER)
    max_messages: int = Field(default=10, strict=True, ge=1, le=MAX_BATCH)
    wait_s: float = Field(default=0.0, ge=0.0)


class Ack(BaseModel):
    """Deliveries of ``group`` that were processed."""

    group: str = _group()
    message_ids: list[str] = Field(min_length=1, max_length=MAX_BATCH)


class Nack(Ack):
    """Deliveries of ``group`` that failed: handed back at once (the attempt counts)."""

    error: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)


class Acked(BaseModel):
    """How many of the ids were pending (acking twice is harmless)."""

    acked: int


class Nacked(BaseModel):
    """How many of the ids were pending and were handed back."""

    nacked: int


def consumer_of(key: ApiKey, consumer: str) -> str:
    """The consumer name ``key`` reads as: an agent's carries its principal.

    A principal outside the name alphabet (or too long) is replaced by a
    digest of it, so every agent has names of its own.
    """
    if key.role != "agent":
        return consumer
    principal = key.principal
    if not _PRINCIPAL.fullmatch(principal):
        principal = "h" + hashlib.sha256(principal.encode()).hexdigest()[:24]
    return f"{principal}:{consumer}"


def _governance(channel: str) -> bool:
    return channel == EVENTS_CHANNEL or channel.startswith(EVENTS_CHANNEL + ".")


def router(server: Server) -> APIRouter:
    """``/v1/bus``."""
    api = APIRouter(
        prefix="/v1/bus",
        tags=["bus"],
        responses=refusals(*COMMON_REFUSALS),
    )
    bus = server.kw.bus
    gatekeeper = server.gatekeeper
    anyone = Depends(gatekeeper.require("agent", "approver", "admin"))
    worker = Depends(gatekeeper.require("agent", "admin"))

    class Subscribe(SubscribeBase):
        """A read through a consumer group: at most ``max_messages``, waiting up to ``wait_s``."""

        wait_s: float = Field(default=0.0, ge=0.0, le=server.settings.max_wait_s)

    def refuse_events(request: Request, key: ApiKey, channel: str, publishing: bool) -> None:
        if not _governance(channel) or (key.role != "agent" and not publishing):
            return
        message = (
            f"{channel!r} carries the engine's governance events: only the engine publishes there"
            if publishing
            else f"an agent key may not read {channel!r} (every agent's governance events)"
        )
        raise gatekeeper.refuse(request, 403, "reserved_channel", message, key, channel=channel)

    @api.post("/{channel}/publish")
    def publish(
        body: Publish, request: Request, channel: str = _channel(), key: ApiKey = worker
    ) -> Message:
        """Append a message to ``channel`` (created on first publish); idempotent with ``key``."""
        refuse_events(request, key, channel, publishing=True)
        return bus.publish(channel, body.payload, deliver_at=body.deliver_at, key=body.key)

    async def subscribe(
        body: SubscribeBase, request: Request, channel: str = _channel(), key: ApiKey = worker
    ) -> list[Delivery]:
        """Take up to ``max_messages`` deliveries; waits up to ``wait_s`` for the first.

        The group is created (start ``new``) on first use. An agent key's
        consumer is named after it (``builder:worker-1``). Ack what was
        processed: the rest comes back after the group's visibility timeout.
        A client that hangs up while waiting takes nothing.
        """
        refuse_events(request, key, channel, publishing=False)
        consumer = consumer_of(key, body.consumer)
        # The async twin waits without holding a worker thread or the loop;
        # cancelled when the client leaves, it hands back what it took.
        reading = bus.asubscribe(channel, body.group, consumer, body.max_messages, body.wait_s)
        return await unless_disconnected(request, reading)

    # The body's bound on wait_s is this server's setting, so its model is
    # made here; FastAPI reads the annotation, which a local name under
    # ``from __future__ import annotations`` cannot be: give it the class.
    subscribe.__annotations__["body"] = Subscribe
    api.add_api_route("/{channel}/subscribe", subscribe, methods=["POST"])

    @api.post("/{channel}/ack")
    async def ack(body: Ack, channel: str = _channel(), _: ApiKey = worker) -> Acked:
        """Mark deliveries processed; returns how many were pending."""
        return Acked(acked=await bus.aack(channel, body.group, body.message_ids))

    @api.post("/{channel}/nack")
    async def nack(body: Nack, channel: str = _channel(), _: ApiKey = worker) -> Nacked:
        """Hand deliveries back now: the next read redelivers them (dead-lettered at the last)."""
        count = await bus.anack(channel, body.group, body.message_ids, error=body.error)
        return Nacked(nacked=count)

    @api.get("/{channel}/peek")
    async def peek(
        request: Request,
        channel: str = _channel(),
        after_seq: int = Query(default=0, ge=0, lt=2**63),
        limit: int = Query(default=100, ge=1, le=1000),
        key: ApiKey = anyone,
    ) -> list[Message]:
        """Visible messages with ``seq > after_seq``, oldest first; consumes nothing."""
        refuse_events(request, key, channel, publishing=False)
        return await bus.apeek(channel, after_seq, limit)

    @api.get("/channels")
    def channels(_: ApiKey = anyone) -> list[ChannelInfo]:
        """Every channel: its newest seq, how many messages it keeps, its groups, retention."""
        return bus.channels()

    @api.get("/groups")
    def groups(
        channel: str | None = Query(default=None, max_length=_CHANNEL_CHARS, pattern=_NAME),
        _: ApiKey = anyone,
    ) -> list[GroupInfo]:
        """Consumer groups (of one channel, or all) with what is pending and what lags."""
        return bus.groups(channel)

    return api
