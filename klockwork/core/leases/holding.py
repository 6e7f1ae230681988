"""Holding leases for the length of a ``with`` block.

:class:`HeldLeases` is what the block sees; :class:`Holding` and
:class:`AsyncHolding` are the context managers ``LeaseManager.hold`` /
``ahold`` return. They are small classes rather than ``@contextmanager``
generators because a protected tool call enters one on every call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from klockwork.core.errors import EventLoopBlockedError, InvalidRequestError, LeaseLostError
from klockwork.core.model import Lease
from klockwork.core.validation import check_flag

if TYPE_CHECKING:
    from klockwork.core.leases.manager import LeaseManager

__all__ = ["HOLD_NAMES", "AsyncHolding", "HeldLeases", "Holding"]


class HeldLeases:
    """The leases held by a ``with kw.lease(...)`` block.

    ``lost`` turns True the moment a renewal fails (the lease expired or was
    revoked); the block then raises :class:`~klockwork.LeaseLostError` on exit.
    """

    __slots__ = ("_lost_reason", "leases")

    def __init__(self, leases: list[Lease]) -> None:
        self.leases = leases
        self._lost_reason: str | None = None

    @property
    def lease(self) -> Lease:
        """The single lease (for one-intent blocks)."""
        if len(self.leases) != 1:
            raise InvalidRequestError("lease", len(self.leases), "several leases; use .leases")
        return self.leases[0]

    @property
    def lease_ids(self) -> list[str]:
        """Ids of every held lease."""
        return [lease.lease_id for lease in self.leases]

    @property
    def lost(self) -> bool:
        """True once a renewal failed: the leases may now belong to someone else."""
        return self._lost_reason is not None

    @property
    def lost_reason(self) -> str | None:
        """Why the leases were lost, or None."""
        return self._lost_reason

    def mark_lost(self, reason: str) -> None:
        """Record that the leases were lost (called by the renewer)."""
        if self._lost_reason is None:
            self._lost_reason = reason

    def __repr__(self) -> str:
        state = f"lost: {self._lost_reason}" if self.lost else "held"
        return f"HeldLeases({[lease.resource for lease in self.leases]}, {state})"


HoldArgs = tuple[str, str, Any, int, "float | None"]


#: How a holder is named in an :class:`~klockwork.EventLoopBlockedError`: the
#: sync call the user wrote, and its async twin.
HOLD_NAMES = ("with kw.leases.hold(...)", "async with kw.leases.ahold(...)")


class _HoldingBase:
    """What the sync and async holders share: arguments, and the end of the block."""

    __slots__ = ("_args", "_auto_renew", "_held", "_manager", "_names")

    def __init__(
        self,
        manager: LeaseManager,
        args: HoldArgs,
        auto_renew: bool,
        names: tuple[str, str] = HOLD_NAMES,
    ) -> None:
        self._manager = manager
        self._args = args
        self._auto_renew = check_flag(auto_renew, "auto_renew")
        self._names = names
        self._held: HeldLeases | None = None

    def _start(self, leases: list[Lease]) -> HeldLeases:
        self._held = held = HeldLeases(leases)
        if self._auto_renew:
            self._manager._renewer.add(held, self._args[3] / 3000)  # every ttl/3
        return held

    def _stop(self) -> HeldLeases:
        """Stop renewing; the caller then releases every lease of the result."""
        held = self._held
        assert held is not None, "exit without enter"
        self._manager._renewer.remove(held)
        return held

    @staticmethod
    def _raise_if_lost(held: HeldLeases, exc_type: type[BaseException] | None) -> None:
        # An exception from the block itself wins: it is what the caller needs.
        if exc_type is None and held.lost:
            first = held.leases[0].lease_id if held.leases else ""
            raise LeaseLostError(first, f"lease lost while held: {held.lost_reason}")


class Holding(_HoldingBase):
    """``with kw.leases.hold(...) as held:`` (see ``LeaseManager.hold``)."""

    __slots__ = ()

    def __enter__(self) -> HeldLeases:
        try:
            verdict = self._manager.acquire(*self._args)
        except EventLoopBlockedError as exc:
            raise exc.as_call(*self._names) from None
        return self._start(list(verdict.leases))

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        held = self._stop()
        ids = held.lease_ids
        if len(ids) == 1:
            self._manager.release(ids[0])
        else:  # a manifest's leases: one store call
            self._manager.release_many(ids)
        self._raise_if_lost(held, exc_type)


class AsyncHolding(_HoldingBase):
    """``async with kw.leases.ahold(...) as held:`` (see ``LeaseManager.ahold``)."""

    __slots__ = ()

    async def __aenter__(self) -> HeldLeases:
        return self._start(list((await self._manager.aacquire(*self._args)).leases))

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        held = self._stop()
        ids = held.lease_ids
        if len(ids) == 1:
            await self._manager.arelease(ids[0])
        else:  # a manifest's leases: one store call
            await self._manager.arelease_many(ids)
        self._raise_if_lost(held, exc_type)
