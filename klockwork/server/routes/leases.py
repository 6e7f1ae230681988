"""Leases over HTTP: acquire, release, heartbeat, list, revoke, and the fencing check.

An agent key (or an admin key) acquires as its own principal: the lease's
agent id is the key's, never the body's. It releases and renews only its
own leases (another agent's: 403 ``not_your_lease``, audited as
``access.denied``); an admin revokes anyone's. Every key reads the lease
board.

A blocking acquire (``wait_s > 0``) waits on the event loop without
blocking it (``aacquire``), for at most the server's ``max_wait_s``, and is
withdrawn (with its reservation) when the client goes away first, so that
nobody is granted a lease no client is left to use or release.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from klockwork.core.errors import StaleLeaseError
from klockwork.core.leases.manager import DEFAULT_TTL_MS
from klockwork.core.model import Lease, Predicate, Verdict, Waiter
from klockwork.core.validation import INT64_MAX, MAX_IDENTITY_CHARS, MAX_KEY_CHARS, MAX_TTL_MS
from klockwork.server.context import Server
from klockwork.server.errors import COMMON_REFUSALS, ApiError, refusals
from klockwork.server.keys import ApiKey

__all__ = [
    "FencingOutcome",
    "LeaseIntent",
    "LeaseRenewal",
    "LeaseRequest",
    "LeaseRevocation",
    "ReleaseOutcome",
    "RevokeOutcome",
    "check_wait",
    "router",
    "unless_disconnected",
]

_T = TypeVar("_T")

#: The most intents one request may name (a manifest: all granted or none).
MAX_INTENTS = 256
#: The longest resource key the engine accepts (``rules.MAX_RESOURCE_CHARS``).
MAX_RESOURCE_CHARS = 4096


class LeaseIntent(BaseModel):
    """One resource and what the agent means to do with it."""

    resource: str = Field(
        min_length=1,
        max_length=MAX_RESOURCE_CHARS,
        description="`TYPE:path`, e.g. `FILE:/src/app.py`",
        examples=["FILE:/src/app.py"],
    )
    predicate: Predicate


class LeaseRequest(BaseModel):
    """A lease request of the key's agent (a body ``agent_id`` is ignored).

    ``wait_s`` 0 tries once and answers the verdict (GRANTED, WAIT or DIE);
    above 0 it waits until granted, or answers 409 ``lease_timeout``.
    """

    session_id: str = Field(min_length=1, max_length=MAX_IDENTITY_CHARS)
    intents: list[LeaseIntent] = Field(min_length=1, max_length=MAX_INTENTS)
    ttl_ms: int = Field(default=DEFAULT_TTL_MS, strict=True, gt=0, le=MAX_TTL_MS)
    wait_s: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="seconds to wait for a grant (at most the server's `max_wait_s`)",
    )


class LeaseRenewal(BaseModel):
    """A heartbeat: the new TTL from now (the lease's own TTL when null)."""

    ttl_ms: int | None = Field(default=None, strict=True, gt=0, le=MAX_TTL_MS)


class LeaseRevocation(BaseModel):
    """Why an operator takes a lease away (kept in the audit trail)."""

    reason: str = Field(default="revoked", max_length=10_000)


class ReleaseOutcome(BaseModel):
    """``released`` is False when the lease was no longer active (nothing changed)."""

    released: bool


class RevokeOutcome(BaseModel):
    """``revoked`` is False when the lease was no longer active (nothing changed)."""

    revoked: bool


class FencingOutcome(BaseModel):
    """The token may still write (a stale one is answered 409 ``stale_fencing_token``)."""

    valid: bool


def check_wait(wait_s: float, max_wait_s: float) -> float:
    """``wait_s`` if this server lets a request wait that long; 422 naming ``wait_s`` if not."""
    if not 0 <= wait_s <= max_wait_s:  # also refuses NaN
        raise ApiError(
            422,
            "invalid_request",
            f"invalid wait_s: {wait_s} is not between 0 and this server's "
            f"max_wait_s ({max_wait_s} s)",
            "wait_s",
        )
    return wait_s


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await ``work``, cancelling it if the client disconnects first.

    A blocking call (a lease acquire, an approval long-poll) whose client
    has left is cancelled rather than left to finish: the engine withdraws
    a cancelled acquire, so it is not granted to nobody. (A grant that
    lands in the same instant as the disconnect is held until its TTL, as
    with any answer lost on the way.)

    Raises:
        ApiError: 499 ``client_closed_request`` when the client left first
            (nobody reads it; it ends the request).
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled (shutdown): withdraw too
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):  # the withdrawal's own outcome is moot
            await task
        raise ApiError(499, "client_closed_request", "the client went away while waiting")
    return task.result()


def router(server: Server) -> APIRouter:
    """``/v1/leases`` and ``/v1/fencing/check``."""
    api = APIRouter(
        prefix="/v1",
        tags=["leases"],
        responses=refusals(*COMMON_REFUSALS),
    )
    kw = server.kw
    gatekeeper = server.gatekeeper
    max_wait_s = server.settings.max_wait_s
    actor = Depends(gatekeeper.require("agent", "admin"))
    reader = Depends(gatekeeper.require("agent", "approver", "admin"))
    admin = Depends(gatekeeper.require("admin"))
    not_found = refusals(404)
    ended = refusals(404, 410)

    def existing(lease_id: str) -> Lease:
        lease = kw.leases.get(lease_id)
        if lease is None:
            raise ApiError(404, "lease_not_found", f"no lease {lease_id!r}", "lease_id")
        return lease

    def own(request: Request, lease_id: str, key: ApiKey) -> Lease:
        lease = existing(lease_id)
        if lease.agent_id != key.principal:
            raise gatekeeper.refuse(
                request,
                403,
                "not_your_lease",
                f"lease {lease_id!r} is held by {lease.agent_id!r}, not by {key.principal!r}",
                key,
                lease_id=lease_id,
                holder=lease.agent_id,
            )
        return lease

    @api.post(
        "/leases",
        responses=refusals(409),
        description=(
            "Acquire as the key's agent. `wait_s` 0: one try, answered with the verdict "
            "(GRANTED, WAIT or DIE). `wait_s` > 0: wait until granted or answer 409 "
            f"`lease_timeout`; this server allows at most {max_wait_s} s."
        ),
    )
    async def acquire(body: LeaseRequest, request: Request, key: ApiKey = actor) -> Verdict:
        """Acquire leases as the key's agent, once or waiting up to ``wait_s``."""
        wait_s = check_wait(body.wait_s, max_wait_s)
        intents = [(i.resource, i.predicate.value) for i in body.intents]
        if wait_s == 0:
            once = kw.leases.atry_acquire(key.principal, body.session_id, intents, body.ttl_ms)
            return await once
        waiting = kw.leases.aacquire(
            key.principal, body.session_id, intents, body.ttl_ms, timeout_s=wait_s
        )
        verdict = await unless_disconnected(request, waiting)
        if not await kw.store.run_io(gatekeeper.still_valid, request, key):
            # Revoked while it waited: nobody could use or release the grant.
            for lease in verdict.leases:
                await kw.leases.arelease(lease.lease_id)
            raise ApiError(401, "unauthenticated", "the API key was revoked while it waited")
        return verdict

    @api.get("/leases")
    def list_leases(
        key: ApiKey = reader,
        agent_id: str | None = Query(default=None, min_length=1, max_length=MAX_KEY_CHARS),
        resource: str | None = Query(default=None, min_length=1, max_length=MAX_RESOURCE_CHARS),
    ) -> list[Lease]:
        """Active leases, oldest first: of one agent, and/or overlapping ``resource``."""
        return kw.leases.list(agent_id, resource)

    @api.get("/waiters")
    def list_waiters(
        key: ApiKey = reader,
        resource: str | None = Query(default=None, min_length=1, max_length=MAX_RESOURCE_CHARS),
    ) -> list[Waiter]:
        """Agents blocked in acquire (any process), oldest first: served in this order."""
        return kw.leases.waiters(resource)

    @api.get("/leases/{lease_id}", responses=not_found)
    def get_lease(lease_id: str, key: ApiKey = reader) -> Lease:
        """One lease in its current state (active, released, expired or revoked)."""
        return existing(lease_id)

    @api.post("/leases/{lease_id}/release", responses=not_found)
    def release(lease_id: str, request: Request, key: ApiKey = actor) -> ReleaseOutcome:
        """Release one of the key's own leases (False: it was no longer active)."""
        own(request, lease_id, key)
        return ReleaseOutcome(released=kw.leases.release(lease_id))

    @api.post("/leases/{lease_id}/heartbeat", responses=ended)
    def heartbeat(
        lease_id: str, request: Request, body: LeaseRenewal | None = None, key: ApiKey = actor
    ) -> Lease:
        """Extend one of the key's own active leases to now + ``ttl_ms``.

        An expired or revoked lease is never revived (410).
        """
        own(request, lease_id, key)
        return kw.leases.heartbeat(lease_id, None if body is None else body.ttl_ms)

    @api.post("/leases/{lease_id}/revoke", responses=not_found)
    def revoke(lease_id: str, body: LeaseRevocation, key: ApiKey = admin) -> RevokeOutcome:
        """Take a lease away from its holder (admin); it loses it at its next renewal."""
        existing(lease_id)
        return RevokeOutcome(revoked=kw.leases.revoke(lease_id, body.reason))

    @api.get("/fencing/check", responses=refusals(409))
    def check_fencing(
        resource: str = Query(min_length=1, max_length=MAX_RESOURCE_CHARS),
        token: int = Query(ge=0, le=INT64_MAX),
        key: ApiKey = reader,
    ) -> FencingOutcome:
        """Whether a write carrying fencing ``token`` on ``resource`` may still land.

        Refused (409 ``stale_fencing_token``) once a newer lease was granted on
        the resource, a directory above it or a path inside it, and this one ended.
        """
        try:
            kw.leases.check_fencing(resource, token)
        except StaleLeaseError as exc:
            raise ApiError(409, "stale_fencing_token", str(exc), "token") from None
        return FencingOutcome(valid=True)

    return api
