"""``@klock_protected``: lease a tool's resources for as long as it runs.

Two call forms share one implementation:

* **Klock's signature**, so code written for ``klock-langchain`` switches by
  changing an import::

      @klock_protected(client, "agent-a", "session-1", "FILE",
                       lambda kwargs: kwargs["path"], predicate="MUTATES",
                       ttl_ms=60_000, max_retries=10)

  ``client`` is a :class:`klockwork.KlockClient` or a :class:`klockwork.Klockwork`
  (klockwork's engine: release notifications, reservations, fencing), or
  Klock's own client — any object with ``acquire_lease``/``release_lease``,
  driven with Klock's semantics (:mod:`.klock_client`). A refused call
  raises :class:`~.errors.KlockConflictError` (as Klock does); inside
  LangGraph's ``ToolNode`` or ``create_agent`` that becomes an error
  ``ToolMessage``, not the end of the run.

* **The short form**, with identity taken from the call's config
  (:func:`~.identity.resolve_identity`)::

      @klock_protected("FILE:{path}", predicate="MUTATES")

  A refused call ends as an error ``ToolMessage`` (``on_conflict="tool_error"``).

Whatever the form and position, an argument the model chose that makes no
usable resource (``path="../etc/passwd"``) raises
:class:`~.errors.ToolArgumentError` — a ``ValueError`` — or, for tool
objects in ``tool_error`` mode, ends as an error ``ToolMessage``; inside
``ToolNode`` / ``create_agent`` both reach the model as error messages.

The decorator goes below ``@tool`` (on the function), above it (on the tool
object), or on a ``BaseTool`` subclass's ``_run`` / ``_arun``; sync and async.
Below ``@tool`` and on methods a refused call raises ``KlockConflictError``
in both modes: it is a LangGraph ``ToolInvocationError`` (and so a
``ToolException``), which ``ToolNode``'s default error handling — and a
tool with ``handle_tool_error=True`` — answers with an error
``ToolMessage``. Above ``@tool`` see :mod:`.tools`.

**max_retries.** Klock retried a WAIT up to ``max_retries`` times, sleeping
``wait_time or 1000`` ms each time, and never retried a DIE. klockwork waits
on release notifications instead of sleeping, and retries DIE with back-off,
so a count of attempts means nothing; ``max_retries`` is therefore a *time
budget* of :data:`RETRY_BUDGET_S` (1 s, Klock's default sleep) per retry:
``timeout_s = max_retries * 1.0``. ``max_retries=10`` gives up after 10 s;
``max_retries=0`` tries exactly once. An explicit ``timeout_s=`` wins.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from langchain_core.tools import BaseTool

from klockwork.core.compat import KlockClient
from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError
from klockwork.core.leases.manager import DEFAULT_TTL_MS
from klockwork.core.model import Predicate
from klockwork.integrations.langchain.guard import Guard, OnConflict, make_guard
from klockwork.integrations.langchain.klock_client import KlockClientLeases, is_klock_client
from klockwork.integrations.langchain.resources import (
    Extractor,
    ResourceSpec,
    klock_resolver,
    template_resolver,
)
from klockwork.integrations.langchain.tools import DEFAULT_TIMEOUT_S, protect_with_guard

__all__ = ["RETRY_BUDGET_S", "KlockProtector", "klock_protected"]

#: Seconds of waiting each of Klock's ``max_retries`` stands for.
RETRY_BUDGET_S = 1.0
#: Klock's default TTL for ``klock_protected``.
KLOCK_TTL_MS = 60_000

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T", bound=BaseTool)


class KlockProtector:
    """What ``klock_protected(...)`` returns: apply it to a function, method or tool."""

    __slots__ = ("guard",)

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    @overload
    def __call__(self, target: _T) -> _T: ...
    @overload
    def __call__(self, target: _F) -> _F: ...
    def __call__(self, target: Any) -> Any:
        """Protect ``target``.

        Args:
            target: a function or coroutine function (below ``@tool``), a
                ``_run``/``_arun`` method, or a ``BaseTool`` (above ``@tool``).

        Returns:
            A guarded function with the same name, docstring and signature,
            or a protected copy of the tool.

        Raises:
            InvalidRequestError: ``target`` is a class or not callable.
        """
        if isinstance(target, BaseTool):
            return protect_with_guard(target, self.guard)
        if inspect.isclass(target) or not callable(target):
            raise InvalidRequestError(
                "target",
                target,
                "decorate a function, a BaseTool instance, or a tool class's _run/_arun",
            )
        return self.guard.wrap(target)


@overload
def klock_protected(
    resource: ResourceSpec,
    predicate: str | Predicate = "MUTATES",
    *,
    kw: Klockwork | None = None,
    agent_id: str | None = None,
    session_id: str | None = None,
    ttl_ms: int = DEFAULT_TTL_MS,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    on_conflict: OnConflict = "tool_error",
) -> KlockProtector: ...
@overload
def klock_protected(
    klock_client: KlockClient | Klockwork | Any,
    agent_id: str | None,
    session_id: str | None,
    resource_type: str,
    resource_path_extractor: Extractor,
    predicate: str | Predicate = "MUTATES",
    ttl_ms: int = KLOCK_TTL_MS,
    max_retries: int = 10,
    *,
    timeout_s: float | None = None,
    on_conflict: OnConflict = "raise",
) -> KlockProtector: ...
def klock_protected(*args: Any, **kwargs: Any) -> KlockProtector:
    """Hold leases on a tool's resources for as long as each call runs.

    Short form — ``klock_protected(resource, predicate="MUTATES", *, kw=None,
    agent_id=None, session_id=None, ttl_ms=30000, timeout_s=30.0,
    on_conflict="tool_error")``:

    * ``resource``: ``"FILE:{path}"`` formatted with the call's named
      arguments, a callable taking them as a dict and returning one or
      several ``TYPE:path`` keys, or a list of these (one atomic manifest);
    * identity from ``agent_id``/``session_id``, else from the call's config;
    * ``kw``: the engine, ``Klockwork.default()`` when None.

    Klock's form — ``klock_protected(klock_client, agent_id, session_id,
    resource_type, resource_path_extractor, predicate="MUTATES",
    ttl_ms=60000, max_retries=10, *, timeout_s=None, on_conflict="raise")``:
    ``klock_client`` is a ``KlockClient`` or ``Klockwork``; the extractor
    gets the call's arguments dict and returns a path (or several) of
    ``resource_type``; ``agent_id``/``session_id`` may be None to read them
    from the config; ``max_retries`` is a 1 s-per-retry time budget (see
    the module docstring).

    Every call: bad or empty resources raise ``InvalidRequestError`` (a
    ``ValueError``) before anything is leased; WAIT waits for the release,
    DIE backs off and retries; the leases renew every ttl/3 while the
    function runs and are released when it ends, however it ends. A call
    that cannot get its leases in time raises ``KlockConflictError``
    (reason ``WAIT_TIMEOUT`` or ``DIE``), or, for a tool object with
    ``on_conflict="tool_error"``, ends as ``ToolMessage(status="error")``.

    Returns:
        A decorator (:class:`KlockProtector`).

    Raises:
        InvalidRequestError: an invalid option, named in the message.
    """
    # Klock's form has five positional arguments or more; the short form two at most.
    if "klock_client" in kwargs or len(args) > 2 or (args and _is_client(args[0])):
        return KlockProtector(_klock_signature(*args, **kwargs))
    return KlockProtector(_short_signature(*args, **kwargs))


def _is_client(obj: object) -> bool:
    return isinstance(obj, (KlockClient, Klockwork)) or is_klock_client(obj)


def _short_signature(
    resource: ResourceSpec,
    predicate: str | Predicate = "MUTATES",
    *,
    kw: Klockwork | None = None,
    agent_id: str | None = None,
    session_id: str | None = None,
    ttl_ms: int = DEFAULT_TTL_MS,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    on_conflict: OnConflict = "tool_error",
) -> Guard:
    if isinstance(resource, BaseTool):
        raise InvalidRequestError(
            "resource", resource, "needs a resource first, e.g. @klock_protected('FILE:{path}')"
        )
    return make_guard(
        template_resolver(resource),
        predicate=predicate,
        kw=kw,
        agent_id=agent_id,
        session_id=session_id,
        ttl_ms=ttl_ms,
        timeout_s=timeout_s,
        on_conflict=on_conflict,
    )


def _klock_signature(
    klock_client: KlockClient | Klockwork | Any,
    agent_id: str | None,
    session_id: str | None,
    resource_type: str,
    resource_path_extractor: Extractor,
    predicate: str | Predicate = "MUTATES",
    ttl_ms: int = KLOCK_TTL_MS,
    max_retries: int = 10,
    *,
    timeout_s: float | None = None,
    on_conflict: OnConflict = "raise",
) -> Guard:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise InvalidRequestError("max_retries", max_retries, "must be an int >= 0")
    kw: Klockwork | None = None
    foreign: KlockClientLeases | None = None
    if isinstance(klock_client, KlockClient):
        kw = klock_client.kw
    elif isinstance(klock_client, Klockwork):
        kw = klock_client
    else:  # Klock's own client (or a double): driven with Klock's semantics
        foreign = KlockClientLeases(klock_client, max_retries)
    if timeout_s is None:
        timeout_s = max_retries * RETRY_BUDGET_S
    return make_guard(
        klock_resolver(resource_type, resource_path_extractor),
        predicate=predicate,
        kw=kw,
        agent_id=agent_id,
        session_id=session_id,
        ttl_ms=ttl_ms,
        timeout_s=timeout_s,
        on_conflict=on_conflict,
        klock_client=foreign,
    )
