"""The guarded call every wrapper shares: resources → identity → lease → run.

A :class:`Guard` is built once per decoration (all arguments checked then)
and turns a function into one that, on every call:

1. binds the call's arguments to the function's parameter names (dropping
   ``self``, ``run_manager``, ``config``, ``callbacks``) and computes the
   normalised resources from them (:mod:`.resources`) — an argument that
   makes no usable resource is a :class:`~.errors.ToolArgumentError`,
   raised before anything is leased;
2. resolves who is calling (:func:`.identity.resolve_identity`);
3. holds the leases for the whole call — with klockwork's engine
   (``kw.leases.hold``, or ``ahold`` for coroutines, so the event loop
   never blocks: WAIT waits for the release, DIE backs off and retries, the
   leases renew every ttl/3 and are released in ``finally``), or through a
   Klock client with Klock's semantics (:mod:`.klock_client`);
4. if the leases could not be had within the time allowed, raises
   :class:`~.errors.KlockConflictError` — or, for tool objects in
   ``tool_error`` mode, returns what the tool layer makes of it.

Both errors are for the model: inside ``ToolNode`` / ``create_agent`` they
end as error ``ToolMessage``\\ s, never as the end of the run.
There is no retry loop here: waiting and back-off live in the engine.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

from langchain_core.runnables.config import var_child_runnable_config

from klockwork.core.engine import Klockwork
from klockwork.core.errors import (
    EventLoopBlockedError,
    InvalidRequestError,
    LeaseConflictError,
    LeaseTimeoutError,
)
from klockwork.core.leases.rules import parse_predicate, validate_ttl
from klockwork.core.model import Predicate
from klockwork.core.validation import check_identity, check_timeout
from klockwork.integrations.langchain.errors import (
    ToolArgumentError,
    ToolCallError,
    conflict_from_timeout,
)
from klockwork.integrations.langchain.identity import (
    Identity,
    active_call,
    call_session,
    resolve_identity,
)
from klockwork.integrations.langchain.klock_client import KlockClientLeases
from klockwork.integrations.langchain.resources import ArgumentProblem, Resolver, Resources

__all__ = [
    "ON_CONFLICT_MODES",
    "ConflictResult",
    "EngineLeases",
    "Guard",
    "LeaseBackend",
    "OnConflict",
    "make_guard",
]

OnConflict = Literal["tool_error", "raise"]
ON_CONFLICT_MODES: tuple[str, ...] = ("tool_error", "raise")
#: What a tool object returns instead of raising when its own call is refused
#: (a lease it could not get, or an argument that makes no resource).
ConflictResult = Callable[[ToolCallError], Any]

# Parameters that carry plumbing, not tool input.
_EXCLUDED = frozenset({"self", "cls", "run_manager", "config", "callbacks"})
Intents = list[tuple[str, Predicate]]


class EngineLeases:
    """Leases from a klockwork engine (the given one, else the process default per call)."""

    __slots__ = ("kw",)

    def __init__(self, kw: Klockwork | None) -> None:
        self.kw = kw

    def engine(self) -> Klockwork:
        """The engine given, else ``Klockwork.default()`` (looked up per call)."""
        return self.kw if self.kw is not None else Klockwork.default()

    def identity(self, identity: Identity) -> Identity:
        """Each call leases in its own sub-session (see :func:`.identity.call_session`)."""
        return call_session(identity)

    def hold(
        self, ident: Identity, intents: Intents, ttl_ms: int, timeout_s: float | None
    ) -> AbstractContextManager[object]:
        """Blocking hold: WAIT waits for the release, DIE backs off; renewed every ttl/3."""
        return self.engine().leases.hold(
            ident.agent_id, ident.session_id, intents, ttl_ms, timeout_s=timeout_s
        )

    def ahold(
        self, ident: Identity, intents: Intents, ttl_ms: int, timeout_s: float | None
    ) -> AbstractAsyncContextManager[object]:
        """Async twin of :meth:`hold`."""
        return self.engine().leases.ahold(
            ident.agent_id, ident.session_id, intents, ttl_ms, timeout_s=timeout_s
        )


class _KlockLeases:
    """A Klock client's leases, in the guard's terms (see :mod:`.klock_client`)."""

    __slots__ = ("_client",)

    def __init__(self, client: KlockClientLeases) -> None:
        self._client = client

    def identity(self, identity: Identity) -> Identity:
        # A Klock server knows nothing of sub-sessions: it sees the session named.
        return identity

    def hold(
        self, ident: Identity, intents: Intents, ttl_ms: int, timeout_s: float | None
    ) -> AbstractContextManager[object]:
        return self._client.hold(ident.agent_id, ident.session_id, intents, ttl_ms)

    def ahold(
        self, ident: Identity, intents: Intents, ttl_ms: int, timeout_s: float | None
    ) -> AbstractAsyncContextManager[object]:
        return self._client.ahold(ident.agent_id, ident.session_id, intents, ttl_ms)


LeaseBackend = EngineLeases | _KlockLeases


class _Call(NamedTuple):
    identity: Identity
    intents: Intents
    resources: Resources


@dataclass(frozen=True, slots=True)
class Guard:
    """Validated settings of one protection; wraps functions with :meth:`wrap`."""

    resolver: Resolver
    predicate: Predicate
    leases: LeaseBackend
    agent_id: str | None
    session_id: str | None
    ttl_ms: int
    timeout_s: float | None
    on_conflict: OnConflict

    @property
    def kw(self) -> Klockwork | None:
        """The engine given to the protection (None: the default, or a Klock client)."""
        return self.leases.kw if isinstance(self.leases, EngineLeases) else None

    def prepare(
        self, plan: BindPlan, args: tuple[Any, ...], kwargs: dict[str, Any], tool_name: str
    ) -> _Call:
        """Resources, identity and intents of one call; raises before leasing anything.

        Raises:
            ToolArgumentError: an argument makes no usable resource.
            InvalidRequestError: the protection itself is misconfigured.
        """
        arguments, config = bind_arguments(plan, args, kwargs)
        try:
            resources = self.resolver(arguments)
        except ArgumentProblem as problem:
            raise ToolArgumentError(
                tool_name, problem.argument, problem.value, problem.problem
            ) from problem.__cause__
        identity = self.leases.identity(
            resolve_identity(config, agent_id=self.agent_id, session_id=self.session_id)
        )
        return _Call(identity, [(key, self.predicate) for key in resources.keys], resources)

    def refused(
        self,
        call: _Call,
        exc: LeaseTimeoutError | LeaseConflictError,
        on_own_conflict: ConflictResult | None,
    ) -> Any:
        """Raise the call's :class:`KlockConflictError`, or hand it to ``on_own_conflict``."""
        error = conflict_from_timeout(
            exc,
            agent_id=call.identity.agent_id,
            session_id=call.identity.session_id,
            resource_path=call.resources.label,
            resources=call.resources.keys,
        )
        if on_own_conflict is None:
            raise error from exc
        return on_own_conflict(error)

    def wrap(
        self,
        fn: Callable[..., Any],
        *,
        on_own_conflict: ConflictResult | None = None,
        asynchronous: bool | None = None,
        tool_name: str | None = None,
    ) -> Callable[..., Any]:
        """Return ``fn`` guarded by this protection (same name, docstring, signature).

        Args:
            fn: a function, coroutine function, or method (``self`` first).
            on_own_conflict: when given, the value a refused call returns
                instead of raising (tool objects use it for ``tool_error``):
                for a lease it could not get, and for an argument that makes
                no resource; errors raised by nested protected calls still
                propagate.
            asynchronous: force the async wrapper (for callables known to
                return a coroutine that ``inspect`` cannot recognise); by
                default ``inspect.iscoroutinefunction(fn)`` decides.
            tool_name: the tool's name in messages (default: ``fn.__name__``).

        Raises:
            InvalidRequestError: a template names an argument ``fn`` does not take.
        """
        plan = bind_plan(fn)
        if plan.signature is not None:
            self.resolver.check_parameters(fn, _call_parameters(plan.signature))
        fixed_name = tool_name or str(getattr(fn, "__name__", "tool"))
        # On a BaseTool's _run/_arun the tool is the first argument: name it per call.
        method = fixed_name in ("_run", "_arun")

        def name_of(args: tuple[Any, ...]) -> str:
            if not method:
                return fixed_name
            return str(getattr(args[0], "name", "tool")) if args else "tool"

        def refuse(call: _Call | None, exc: Exception) -> Any:
            # The one place a refusal becomes the model's error (or the tool's message).
            if isinstance(exc, ToolArgumentError):
                if on_own_conflict is None:
                    raise exc
                return on_own_conflict(exc)
            assert call is not None and isinstance(exc, (LeaseTimeoutError, LeaseConflictError))
            return self.refused(call, exc, on_own_conflict)

        if asynchronous is None:
            asynchronous = inspect.iscoroutinefunction(fn)
        if asynchronous:
            # The lease must span the awaited body, so the wrapper itself must be
            # a coroutine function: a sync wrapper would release at once.

            @functools.wraps(fn)
            async def aguarded(*args: Any, **kwargs: Any) -> Any:
                try:
                    call = self.prepare(plan, args, kwargs, name_of(args))
                except ToolArgumentError as exc:
                    return refuse(None, exc)
                ident = call.identity
                acquired = False
                try:
                    async with self.leases.ahold(ident, call.intents, self.ttl_ms, self.timeout_s):
                        acquired = True
                        with active_call(ident):
                            return await fn(*args, **kwargs)
                except (LeaseTimeoutError, LeaseConflictError) as exc:
                    if acquired:  # raised by the function itself, not by our acquire
                        raise
                    return refuse(call, exc)

            return aguarded

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                call = self.prepare(plan, args, kwargs, name_of(args))
            except ToolArgumentError as exc:
                return refuse(None, exc)
            ident = call.identity
            acquired = False
            try:
                with self.leases.hold(ident, call.intents, self.ttl_ms, self.timeout_s):
                    acquired = True
                    with active_call(ident):
                        return fn(*args, **kwargs)
            except (LeaseTimeoutError, LeaseConflictError) as exc:
                if acquired:
                    raise
                return refuse(call, exc)
            except EventLoopBlockedError as exc:
                if acquired:
                    raise
                raise _blocked_as(exc, name_of(args)) from None

        return guarded


def _blocked_as(exc: EventLoopBlockedError, name: str) -> EventLoopBlockedError:
    """Name the call the user made: a tool's ``invoke``, or the function itself."""
    if var_child_runnable_config.get() is not None:  # inside a runnable: a tool call
        return exc.as_call(f"{name}.invoke(...)", f"await {name}.ainvoke(...)")
    return exc.as_call(f"{name}(...)", f"an async def {name} awaited on the loop")


def _call_parameters(signature: inspect.Signature) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in signature.parameters.items() if k not in _EXCLUDED}


def bind_arguments(
    plan: BindPlan, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
    """The call's named tool arguments (defaults applied), and its ``config`` if passed.

    ``**kwargs`` parameters are flattened into the result; plumbing
    parameters (``self``, ``run_manager``, ``config``, ``callbacks``) are left out.
    """
    signature = plan.signature
    if signature is None:
        named: dict[str, Any] = dict(kwargs)
    elif not args and plan.keywords is not None and plan.keywords.issuperset(kwargs):
        # Tool calls pass arguments by name: skip Signature.bind.
        named = {**plan.defaults, **kwargs}
    else:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            # The call itself will fail with Python's own message; don't mask it.
            named = dict(kwargs)
        else:
            bound.apply_defaults()
            named = {}
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(value)
                else:
                    named[name] = value
    config = named.get("config")
    arguments = {k: v for k, v in named.items() if k not in _EXCLUDED}
    return arguments, config if isinstance(config, Mapping) else None


class BindPlan(NamedTuple):
    """What binding a function's arguments needs, computed once per wrapped function."""

    signature: inspect.Signature | None
    #: parameter names when all can be passed by keyword (no *args/**kwargs)
    keywords: frozenset[str] | None
    defaults: dict[str, Any]


def bind_plan(fn: Callable[..., Any]) -> BindPlan:
    """Inspect ``fn`` once, so each call can skip ``Signature.bind`` (3 µs)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature
        return BindPlan(None, None, {})
    params = signature.parameters.values()
    plain = not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) for p in params)
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return BindPlan(signature, frozenset(signature.parameters) if plain else None, defaults)


def make_guard(
    resolver: Resolver,
    *,
    predicate: str | Predicate,
    kw: Klockwork | None,
    agent_id: str | None,
    session_id: str | None,
    ttl_ms: int,
    timeout_s: float | None,
    on_conflict: str,
    klock_client: KlockClientLeases | None = None,
) -> Guard:
    """Check every option once, at decoration time, and build the :class:`Guard`.

    ``klock_client`` (a foreign Klock client, already checked) replaces the
    engine; ``timeout_s`` then plays no part (Klock counts retries).

    Raises:
        InvalidRequestError: an option is invalid (named in the message).
    """
    if kw is not None and not isinstance(kw, Klockwork):
        raise InvalidRequestError("kw", kw, "expected a Klockwork engine or None")
    for name, value in (("agent_id", agent_id), ("session_id", session_id)):
        if value is not None:
            check_identity(value, name)
    timeout_s = check_timeout(timeout_s)
    if on_conflict not in ON_CONFLICT_MODES:
        raise InvalidRequestError(
            "on_conflict", on_conflict, f"expected one of {', '.join(ON_CONFLICT_MODES)}"
        )
    leases: LeaseBackend = EngineLeases(kw) if klock_client is None else _KlockLeases(klock_client)
    return Guard(
        resolver=resolver,
        predicate=parse_predicate(predicate),
        leases=leases,
        agent_id=agent_id,
        session_id=session_id,
        ttl_ms=validate_ttl(ttl_ms),
        timeout_s=None if timeout_s is None else float(timeout_s),
        on_conflict=cast("OnConflict", on_conflict),
    )
