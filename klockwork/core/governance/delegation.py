"""Agents' capabilities and scoped delegation to sub-agents.

An agent's *profile* (its capabilities, who delegated it, until when) is a
record in the engine's store, so every process sharing the store enforces
the same bounds. :func:`~klockwork.core.governance.policy.is_subset` and the TTL
arithmetic below decide; nothing a child claims about itself is trusted.

Rules (each refusal raises :class:`~klockwork.CapabilityError` and creates
nothing):

* a child's capabilities must be provably covered by its parent's;
* a child cannot outlive its parent (``ttl_s`` ends no later than the
  parent's own expiry);
* a revoked or expired agent cannot delegate, and its gates answer
  ``CAPABILITY_DENIED``;
* revoking an agent revokes every descendant and releases their leases;
* a delegated agent cannot be re-registered with other capabilities;
* a child keeps its parent's wait-die priority (its age), so delegating
  never makes work younger or older than the agent that asked for it.

The child's id is ``"<parent_id>/<name>"``, so ids say where they come from
and two parents can both delegate a ``"reviewer"``.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any

from pydantic import BaseModel, ConfigDict

from klockwork.core.clock import Clock
from klockwork.core.errors import CapabilityError, InvalidRequestError
from klockwork.core.events import AuditRecorder
from klockwork.core.governance.policy import capability_allows, is_subset
from klockwork.core.stores.base import Store
from klockwork.core.validation import check_identity, check_text, check_timeout, same_identity

__all__ = [
    "AGENT",
    "AgentProfile",
    "Delegation",
    "DelegationBlock",
    "Delegations",
    "check_capabilities",
]

AGENT = "agent"  # record kind
_FROZEN = ConfigDict(frozen=True)


class AgentProfile(BaseModel):
    """What an agent may do, and the delegation it comes from (stored record).

    Attributes:
        agent_id: the agent.
        capabilities: globs over actions it may take (``["*"]``: anything).
        parent_id: the agent that delegated it; None for a registered agent.
        expires_at_ms: when the delegation ends; None: never.
        revoked_at_ms: when it was revoked; None while it stands.
        status: derived: ``active`` or ``revoked`` (an expired delegation stays
            ``active`` in the store and is judged by ``expires_at_ms``).
    """

    model_config = _FROZEN
    agent_id: str
    capabilities: list[str] = ["*"]
    parent_id: str | None = None
    created_at_ms: int = 0
    expires_at_ms: int | None = None
    revoked_at_ms: int | None = None

    @property
    def status(self) -> str:
        """``revoked`` once revoked, else ``active`` (expiry is judged by ``expires_at_ms``)."""
        return "active" if self.revoked_at_ms is None else "revoked"

    def usable(self, now_ms: int) -> bool:
        """True while neither revoked nor past its expiry."""
        return self.revoked_at_ms is None and (
            self.expires_at_ms is None or now_ms < self.expires_at_ms
        )


class Delegation(BaseModel):
    """A live delegation, as ``with kw.delegate(...) as child`` gives it.

    Attributes:
        agent_id: the child's id (``"<parent_id>/<name>"``): act as this agent.
        parent_id: who delegated.
        capabilities: what the child may do.
        expires_at_ms: when it ends by itself.
    """

    model_config = _FROZEN
    agent_id: str
    parent_id: str
    capabilities: list[str]
    expires_at_ms: int


def check_capabilities(capabilities: object, argument: str = "capabilities") -> list[str]:
    """Validate a list of action globs (a single string is refused: it is a common slip)."""
    if isinstance(capabilities, str) or not isinstance(capabilities, (list, tuple)):
        raise InvalidRequestError(argument, capabilities, "must be a list of action globs")
    if not all(isinstance(c, str) and c.strip() for c in capabilities):
        raise InvalidRequestError(argument, capabilities, "globs must be non-empty strings")
    return list(capabilities)


class Delegations:
    """Capabilities and delegation of one engine (``kw.register_agent`` / ``kw.delegate``).

    Args:
        store: where profiles live.
        clock: time source.
        audit: the audit trail's ``record``.
        register_priority: registers an agent's wait-die priority in the lease
            store (``(agent_id, priority) -> priority``).
        release_leases: releases (revokes) every lease an agent holds.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        audit: AuditRecorder,
        register_priority: Callable[[str, int | None], int],
        release_leases: Callable[[str, str], int],
    ) -> None:
        self._store = store
        self._clock = clock
        self._audit = audit
        self._register_priority = register_priority
        self._release_leases = release_leases

    # -- profiles --------------------------------------------------------------------
    def profile(self, agent_id: str) -> AgentProfile | None:
        """The stored profile, or None (an agent never registered: capabilities ``["*"]``)."""
        return self._store.get_record(AGENT, agent_id, AgentProfile)

    def set_capabilities(self, agent_id: str, capabilities: Sequence[str]) -> AgentProfile:
        """Create or update a registered (not delegated) agent's capabilities."""
        caps = check_capabilities(capabilities)
        now = self._clock.now_ms()

        def put(current: AgentProfile | None) -> tuple[AgentProfile | None, AgentProfile]:
            if current is None:
                new = AgentProfile(agent_id=agent_id, capabilities=caps, created_at_ms=now)
                return new, new
            if current.parent_id is not None:
                raise CapabilityError(
                    f"{agent_id!r} is a delegate of {current.parent_id!r}: its capabilities "
                    "come from the delegation and cannot be changed by registering it"
                )
            if current.capabilities == caps:
                return current, current
            new = current.model_copy(update={"capabilities": caps})
            return new, new

        return self._store.update_record(AGENT, agent_id, AgentProfile, put)

    def allows(self, agent_id: str, action: str, now_ms: int) -> str | None:
        """None when ``agent_id`` may take ``action``; else why not (for the denial message)."""
        profile = self._store.get_record(AGENT, agent_id, AgentProfile)
        if profile is None:
            return None
        if profile.revoked_at_ms is not None:
            return f"agent {agent_id!r} was revoked"
        if profile.expires_at_ms is not None and now_ms >= profile.expires_at_ms:
            return f"the delegation of {agent_id!r} expired"
        if not capability_allows(profile.capabilities, action):
            return f"{action!r} is outside the capabilities {profile.capabilities} of {agent_id!r}"
        return None

    def lineage(self, agent_id: str) -> builtins.list[str]:
        """``agent_id`` and its ancestors, nearest first."""
        chain = [agent_id]
        seen = {agent_id}
        current = self._store.get_record(AGENT, agent_id, AgentProfile)
        while current is not None and current.parent_id is not None:
            if current.parent_id in seen:  # a corrupted cycle must not hang us
                break
            chain.append(current.parent_id)
            seen.add(current.parent_id)
            current = self._store.get_record(AGENT, current.parent_id, AgentProfile)
        return chain

    def kinship(self, requester: str, approver: str) -> str | None:
        """How ``approver`` is ``requester`` for self-approval, or None if it is not.

        Returns ``"itself"`` (the same agent), ``"delegate"`` (``approver``
        descends from ``requester``), ``"delegator"`` (``requester``
        descends from ``approver``), ``"relative"`` (one agent delegated to
        both, e.g. siblings) — or ``"revoked"``: a revoked agent decides nothing.
        """
        if same_identity(approver, requester):
            return "itself"
        profile = self.profile(approver)
        if profile is not None and profile.revoked_at_ms is not None:
            return "revoked"
        # Lineages compared ignoring case, like the identities themselves; a
        # delegate's id is "<parent>/<name>", so a spelling of one that is
        # not registered still names its line.
        folded_approver, folded_requester = approver.casefold(), requester.casefold()
        approver_line = {a.casefold() for a in self.lineage(approver)}
        if folded_requester in approver_line or folded_approver.startswith(folded_requester + "/"):
            return "delegate"
        requester_line = {a.casefold() for a in self.lineage(requester)}
        if folded_approver in requester_line or folded_requester.startswith(folded_approver + "/"):
            return "delegator"
        if approver_line & requester_line:
            return "relative"  # siblings (or cousins): one agent delegated to both
        return None

    # -- delegation ------------------------------------------------------------------
    def create(
        self, parent_id: str, name: str, capabilities: Sequence[str], ttl_s: float
    ) -> Delegation:
        """Create a child of ``parent_id``; see the module docstring for the rules.

        Raises:
            InvalidRequestError: bad arguments.
            CapabilityError: an escalation (capabilities or TTL beyond the
                parent's, a revoked/expired parent, the name already taken).
        """
        check_identity(parent_id, "parent_id")
        check_identity(name, "name")
        if "/" in name:
            raise InvalidRequestError("name", name, "must not contain '/'")
        caps = check_capabilities(capabilities)
        if not check_timeout(ttl_s, "ttl_s", allow_none=False):
            raise InvalidRequestError("ttl_s", ttl_s, "must be > 0 seconds: delegations end")
        now = self._clock.now_ms()
        parent = self.profile(parent_id) or AgentProfile(agent_id=parent_id, created_at_ms=now)
        if not parent.usable(now):
            raise CapabilityError(f"{parent_id!r} is revoked or expired and cannot delegate")
        if not is_subset(caps, parent.capabilities):
            raise CapabilityError(
                f"capabilities {caps} are not within {parent_id!r}'s {parent.capabilities}"
            )
        expires = now + math.ceil(ttl_s * 1000)
        if parent.expires_at_ms is not None and expires > parent.expires_at_ms:
            raise CapabilityError(
                f"ttl_s={ttl_s} would outlive {parent_id!r}, whose delegation ends at "
                f"{parent.expires_at_ms} ms ({(parent.expires_at_ms - now) / 1000:.3f} s left)"
            )
        child_id = f"{parent_id}/{name}"
        child = AgentProfile(
            agent_id=child_id,
            capabilities=caps,
            parent_id=parent_id,
            created_at_ms=now,
            expires_at_ms=expires,
        )

        def put(current: AgentProfile | None) -> tuple[AgentProfile | None, bool]:
            if current is not None and current.usable(now):
                return current, False
            self._audit(  # with the delegation itself: both are stored, or neither
                "delegation.created",
                parent_id,
                None,
                {"child_id": child_id, "capabilities": caps, "expires_at_ms": expires},
                ts=now,
            )
            return child, True

        # The child keeps the parent's age for wait-die (registered first: the
        # parent's priority is fixed by then).
        priority = self._register_priority(parent_id, None)
        if not self._store.update_record(AGENT, child_id, AgentProfile, put):
            raise CapabilityError(f"{child_id!r} is already delegated; pick another name")
        self._register_priority(child_id, priority)
        # A revocation of the parent that marked it after the check above has
        # listed its children before this one existed: revoke it here (the
        # revocation marks first and lists after, so one of the two sees it).
        after = self.profile(parent_id)
        if after is not None and after.revoked_at_ms is not None:
            self._revoke_one(child_id, f"{parent_id!r} was revoked")
            raise CapabilityError(f"{parent_id!r} was revoked while delegating to {child_id!r}")
        return Delegation(
            agent_id=child_id, parent_id=parent_id, capabilities=caps, expires_at_ms=expires
        )

    def revoke(self, agent_id: str, reason: str = "revoked") -> builtins.list[str]:
        """Revoke ``agent_id`` and all its descendants, releasing their leases.

        Returns the ids revoked now (already revoked ones are skipped).
        """
        check_identity(agent_id, "agent_id")
        check_text(reason, "reason")
        # Mark first, then list: a delegate created meanwhile either is listed
        # below or finds its parent revoked when it checks again (see create).
        revoked = [agent_id] if self._revoke_one(agent_id, reason) else []
        profiles = self._store.list_records(AGENT, AgentProfile)
        children: dict[str, builtins.list[str]] = {}
        for p in profiles:
            if p.parent_id is not None:
                children.setdefault(p.parent_id, []).append(p.agent_id)
        seen, stack = {agent_id}, list(children.get(agent_id, ()))
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if self._revoke_one(current, f"{agent_id!r} was revoked: {reason}"):
                revoked.append(current)
            stack.extend(children.get(current, ()))
        return revoked

    def _revoke_one(self, agent_id: str, reason: str) -> bool:
        """Revoke one agent: no new lease from now on, then its leases released."""
        now = self._clock.now_ms()
        self._store.revoke_agent(agent_id, now)  # refuses its lease requests from here on

        def mark(current: AgentProfile | None) -> tuple[AgentProfile | None, bool]:
            if current is None:
                new = AgentProfile(agent_id=agent_id, created_at_ms=now)
            elif current.revoked_at_ms is not None:
                return current, False
            else:
                new = current
            self._audit("delegation.revoked", agent_id, None, {"reason": reason}, ts=now)
            return new.model_copy(update={"revoked_at_ms": now}), True

        if not self._store.update_record(AGENT, agent_id, AgentProfile, mark):
            return False
        # Each lease ends as its own audited decision (lease.revoked).
        self._release_leases(agent_id, f"delegation revoked: {reason}")
        return True

    def parallel(
        self, parent_id: str, specs: Iterable[tuple[str, Sequence[str], float]]
    ) -> Iterator[builtins.list[Delegation]]:
        """Create several children; revoke every one created if any creation fails.

        A generator for :func:`contextlib.contextmanager` (the engine wraps it).
        """
        if isinstance(specs, (str, bytes, dict)) or not isinstance(specs, Iterable):
            raise InvalidRequestError(
                "delegations", specs, "must be a list of (name, capabilities, ttl_s)"
            )
        with ExitStack() as stack:
            created = []
            for spec in specs:
                name, caps, ttl = _spec(spec)
                child = self.create(parent_id, name, caps, ttl)
                stack.callback(self.revoke, child.agent_id, "delegation block left")
                created.append(child)
            yield created


class DelegationBlock:
    """What ``kw.delegate(...)`` returns: a sync *and* async context manager.

    Entering creates the child (on a worker thread under ``async with`` when
    the store does I/O); leaving revokes it and releases its leases, whether
    the block ended normally or with an error.
    """

    def __init__(
        self,
        delegations: Delegations,
        request: tuple[str, str, Sequence[str], float],
        store: Store,
        engine_closed: Callable[[], bool],
    ) -> None:
        self._delegations = delegations
        self._request = request
        self._store = store
        self._engine_closed = engine_closed
        self._child: Delegation | None = None

    def __enter__(self) -> Delegation:
        if self._child is not None:
            raise InvalidRequestError(
                "delegate", self._request[1], "this block was entered already"
            )
        self._child = self._delegations.create(*self._request)
        return self._child

    def __exit__(self, *exc_info: object) -> None:
        child, self._child = self._child, None
        if child is not None and not self._engine_closed():
            self._delegations.revoke(child.agent_id, "delegation block left")

    async def __aenter__(self) -> Delegation:
        return await self._store.run_io(self.__enter__)

    async def __aexit__(self, *exc_info: object) -> None:
        await self._store.run_io(self.__exit__, *exc_info)


def _spec(spec: Any) -> tuple[str, Sequence[str], float]:
    if isinstance(spec, dict):
        try:
            return spec["name"], spec["capabilities"], spec["ttl_s"]
        except KeyError as exc:
            raise InvalidRequestError("delegations", spec, f"missing key {exc}") from None
    if isinstance(spec, (tuple, list)) and len(spec) == 3:
        return spec[0], spec[1], spec[2]
    raise InvalidRequestError(
        "delegations",
        spec,
        "each delegation is (name, capabilities, ttl_s) or a dict with those keys",
    )
