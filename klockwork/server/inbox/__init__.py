"""Placeholder: the approvals inbox at ``/`` (see issue 14)."""

from __future__ import annotations

from fastapi import APIRouter

from klockwork.server.context import Server

__all__ = ["router"]


def router(server: Server) -> APIRouter:
    """The inbox's pages and forms (not part of the OpenAPI schema)."""
    return APIRouter(include_in_schema=False)
