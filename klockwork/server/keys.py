"""API keys: who a request to ``klockwork serve`` is, and what it may do.

A key belongs to one *principal* with one *role*:

* ``agent``: the principal is an agent id; the key acts as that agent only
  (its leases, its gates, its bus consumers). ``owner`` may name the person
  who runs the agent: that person cannot approve the agent's requests.
* ``approver``: a person who lists and decides approvals and reads the
  audit trail; the policies still say whose vote counts.
* ``admin``: all of the above but acting as an agent, plus keys, revoking
  leases and agents.

The secret is shown once, when the key is created: ``kw_<key id>_<secret>``.
The store keeps the key id, the SHA-256 of the whole key and the key's
facts, never the key: a copy of the store does not let anyone in. A key is
high-entropy (256 random bits), so a plain hash is enough; no slow KDF is
needed as it would be for a password. Keys live in the engine's store
(record kind ``apikey``), so every server process on that store, and
``klockwork keys`` on the command line, see the same keys at once.

This module does not import FastAPI: ``klockwork keys`` works without the
``server`` extra.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict

from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError
from klockwork.core.validation import check_identity, same_identity

__all__ = ["ROLES", "ApiKey", "ApiKeys", "KeyInfo", "Role"]

Role = Literal["agent", "approver", "admin"]
#: Every role a key may have, least powerful first.
ROLES: tuple[Role, ...] = ("agent", "approver", "admin")

KEY_KIND = "apikey"  # record kind in the store
_PREFIX = "kw_"
_KEY_SHAPE = re.compile(r"kw_([0-9a-f]{16})_[A-Za-z0-9_-]{43}")
_LABEL_MAX = 200


class KeyInfo(BaseModel):
    """What anyone may be shown of one key: neither the key nor its hash.

    Attributes:
        key_id: the public part of the key (``kw_<key_id>_...``).
        principal: who the key speaks for (an agent id, or a person).
        role: ``agent``, ``approver`` or ``admin``.
        owner: for an agent key, the person who runs the agent (may be None).
        label: free text, e.g. where the key is used.
        status: ``active`` or ``revoked``.
    """

    model_config = ConfigDict(frozen=True)

    key_id: str
    principal: str
    role: Role
    owner: str | None = None
    label: str = ""
    status: Literal["active", "revoked"] = "active"
    created_at_ms: int
    revoked_at_ms: int | None = None


class ApiKey(KeyInfo):
    """What the store keeps of one key: its facts and the SHA-256 of the key."""

    #: SHA-256 (hex) of the whole key string.
    digest: str

    def public(self) -> KeyInfo:
        """The key's facts without its hash, for answers and listings."""
        return KeyInfo.model_validate(self.model_dump(exclude={"digest"}))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class ApiKeys:
    """The keys of one store: create, list, revoke, and check a presented key."""

    def __init__(self, kw: Klockwork) -> None:
        self._kw = kw

    def create(
        self, principal: str, role: str, *, owner: str | None = None, label: str = ""
    ) -> tuple[ApiKey, str]:
        """Create a key; returns its record and the key, which is never shown again.

        Raises:
            InvalidRequestError: a bad principal, role, owner or label.
            StoreUnavailableError: the store could not answer; no key exists.
        """
        check_identity(principal, "principal")
        if role not in ROLES:
            raise InvalidRequestError("role", role, f"expected one of {', '.join(ROLES)}")
        if owner is not None:
            check_identity(owner, "owner")
            if role != "agent":
                raise InvalidRequestError("owner", owner, "only an agent key has an owner")
        if not isinstance(label, str) or len(label) > _LABEL_MAX:
            raise InvalidRequestError("label", label, f"must be text of at most {_LABEL_MAX}")
        key_id = secrets.token_hex(8)
        secret = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(
            key_id=key_id,
            principal=principal,
            role=role,
            owner=owner,
            label=label,
            created_at_ms=self._kw.clock.now_ms(),
            digest=_digest(secret),
        )

        def put(current: ApiKey | None) -> tuple[ApiKey | None, ApiKey]:
            if current is not None:  # 64 random bits collided: refuse, never overwrite
                raise InvalidRequestError("key_id", key_id, "already exists; create again")
            # Audited inside the atomic section: no key exists that the trail lacks.
            self._audit("key.created", record)
            return record, record

        self._kw.store.update_record(KEY_KIND, key_id, ApiKey, put)
        return record, secret

    def list(self, include_revoked: bool = False) -> builtins.list[ApiKey]:
        """Keys in creation order; only active ones unless ``include_revoked``."""
        status = None if include_revoked else "active"
        return self._kw.store.list_records(KEY_KIND, ApiKey, status=status)

    def get(self, key_id: str) -> ApiKey | None:
        """The key with this id (active or revoked), or None."""
        if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{16}", key_id):
            return None
        return self._kw.store.get_record(KEY_KIND, key_id, ApiKey)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key: it is refused from the next request on. Idempotent.

        Raises:
            InvalidRequestError: no key with this id.
        """
        if self.get(key_id) is None:
            raise InvalidRequestError("key_id", key_id, "no such key")
        now = self._kw.clock.now_ms()

        def revoke(current: ApiKey | None) -> tuple[ApiKey | None, ApiKey]:
            assert current is not None  # keys are never deleted
            if current.status == "revoked":
                return current, current
            ended = current.model_copy(update={"status": "revoked", "revoked_at_ms": now})
            self._audit("key.revoked", ended)
            return ended, ended

        return self._kw.store.update_record(KEY_KIND, key_id, ApiKey, revoke)

    def authenticate(self, presented: str) -> ApiKey | None:
        """The active key ``presented`` is, or None (unknown, malformed or revoked).

        The comparison takes the same time whichever character differs.
        """
        shape = _KEY_SHAPE.fullmatch(presented)
        if shape is None:
            return None
        record = self._kw.store.get_record(KEY_KIND, shape.group(1), ApiKey)
        if record is None or not hmac.compare_digest(record.digest, _digest(presented)):
            return None
        return record if record.status == "active" else None

    def runs(self, principal: str, agent_id: str) -> bool:
        """True when ``principal`` owns ``agent_id`` or the root agent it was delegated from.

        Compared as the engine compares who approves (:func:`same_identity`,
        ignoring case): ``"Alice"`` runs what ``"alice"`` runs.
        """
        root = agent_id.split("/", 1)[0]
        return any(
            k.role == "agent"
            and k.owner is not None
            and (same_identity(k.principal, agent_id) or same_identity(k.principal, root))
            and same_identity(k.owner, principal)
            for k in self.list(include_revoked=True)
        )

    def any_active(self) -> bool:
        """True when at least one key can sign in (``serve`` checks it before a public bind)."""
        return bool(self.list())

    def _audit(self, kind: str, record: ApiKey) -> None:
        data = record.public().model_dump()
        self._kw.audit.record(kind, None, None, data, ts=self._kw.clock.now_ms())
