"""Health, who-am-I, and API keys (admin)."""

from __future__ import annotations

import threading
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from klockwork.core.errors import StoreUnavailableError
from klockwork.server.context import Server
from klockwork.server.errors import COMMON_REFUSALS, ApiError, refusals
from klockwork.server.keys import ApiKey, KeyInfo, Role

__all__ = ["CreatedKey", "Health", "KeyRequest", "router"]


class Health(BaseModel):
    """``ok`` when the store answers; ``unavailable`` (with 503) when it does not."""

    status: Literal["ok", "unavailable"]
    version: str


class KeyRequest(BaseModel):
    """A key to create: for whom, with which role."""

    principal: str = Field(min_length=1, max_length=256)
    role: Role
    owner: str | None = Field(default=None, min_length=1, max_length=256)
    label: str = Field(default="", max_length=200)


class CreatedKey(BaseModel):
    """A new key: ``api_key`` is shown this once and never again."""

    api_key: str
    key: KeyInfo


try:
    _VERSION = version("klockwork")
except PackageNotFoundError:  # pragma: no cover - run from a source tree
    _VERSION = "unknown"

ERRORS = refusals(*COMMON_REFUSALS)


class _Probe(BaseModel):
    checked_at_ms: int


class WriteProbe:
    """Whether the store takes a write (a full disk answers reads but no decision).

    It writes one small record at most every :attr:`EVERY_S` seconds, however
    often health is asked (it needs no key): between writes it answers the
    last result.
    """

    EVERY_S = 2.0

    def __init__(self, server: Server) -> None:
        self._kw = server.kw
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._ok = True

    def writes(self) -> bool:
        """True when the last write (at most :attr:`EVERY_S` old) went through."""
        with self._lock:
            if time.monotonic() - self._at < self.EVERY_S:
                return self._ok
            now = self._kw.clock.now_ms()
            try:
                self._kw.store.update_record(
                    "health", "write-probe", _Probe, lambda _: (_Probe(checked_at_ms=now), None)
                )
                self._ok = True
            except StoreUnavailableError:
                self._ok = False
            self._at = time.monotonic()
            return self._ok


def router(server: Server) -> APIRouter:
    """``/v1/health``, ``/v1/whoami``, ``/v1/keys``."""
    api = APIRouter(prefix="/v1", responses=ERRORS)
    gatekeeper = server.gatekeeper
    anyone = Depends(gatekeeper.require("agent", "approver", "admin"))
    admin = Depends(gatekeeper.require("admin"))

    probe = WriteProbe(server)

    @api.get("/health", tags=["system"], responses={503: {"model": Health}})
    def health() -> Health:
        """Whether the server and its store answer, reads and writes; needs no key."""
        try:
            server.kw.store.get_record("apikey", "0" * 16, ApiKey)
        except StoreUnavailableError:
            raise ApiError(503, "store_unavailable", "the store does not answer") from None
        if not probe.writes():
            raise ApiError(503, "store_unavailable", "the store answers but cannot write")
        return Health(status="ok", version=_VERSION)

    @api.get("/whoami", tags=["system"])
    def whoami(key: ApiKey = anyone) -> KeyInfo:
        """The key this request signed in with (its principal and role)."""
        return key.public()

    @api.get("/keys", tags=["keys"])
    def list_keys(_: ApiKey = admin, include_revoked: bool = False) -> list[KeyInfo]:
        """Every key (never the secret, never its hash)."""
        return [k.public() for k in server.keys.list(include_revoked)]

    @api.post("/keys", tags=["keys"], status_code=201)
    def create_key(body: KeyRequest, _: ApiKey = admin) -> CreatedKey:
        """Create a key; the answer holds the key itself, shown only this once."""
        record, secret = server.keys.create(
            body.principal, body.role, owner=body.owner, label=body.label
        )
        return CreatedKey(api_key=secret, key=record.public())

    @api.delete("/keys/{key_id}", tags=["keys"], responses=refusals(404))
    def revoke_key(key_id: str, _: ApiKey = admin) -> KeyInfo:
        """Revoke a key: refused from the next request on (idempotent)."""
        if server.keys.get(key_id) is None:
            raise ApiError(404, "key_not_found", f"no key {key_id!r}", "key_id")
        return server.keys.revoke(key_id).public()

    return api
