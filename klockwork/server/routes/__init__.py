"""The API's routers, one module per part of the engine (each: ``router(server)``)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter

from klockwork.server.context import Server
from klockwork.server.routes import approvals, audit, bus, gates, leases, streams, system

__all__ = ["ROUTERS"]

#: Every router of the app, in the order the OpenAPI schema lists them.
ROUTERS: tuple[Callable[[Server], APIRouter], ...] = (
    system.router,
    leases.router,
    gates.router,
    approvals.router,
    audit.router,
    bus.router,
    streams.router,
)
