"""Placeholder: filled in by the API work (see issue 14)."""

from __future__ import annotations

from fastapi import APIRouter

from klockwork.server.context import Server

__all__ = ["router"]


def router(server: Server) -> APIRouter:
    """The audit routes."""
    return APIRouter(prefix="/v1")
