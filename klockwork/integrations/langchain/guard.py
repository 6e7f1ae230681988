"""The guarded call every wrapper shares: resources → identity → lease → run.

A :class:`Guard` is built once per decoration (all arguments checked then)
and turns a function into one that, on every call:

1. binds the call's arguments to the function's parameter names (dropping
   ``self``, ``run_manager``, ``config``, ``callbacks``) and computes the
   resources from them (:class:`Resources`) — a bad or empty resource is an
   :class:`~klockwork.InvalidRequestError` (a ``ValueError``), raised
   before anything is leased;
2. resolves who is calling (:func:`.identity.resolve_identity`);
3. holds the leases for the whole call with ``kw.leases.hold`` (or
   ``ahold`` for coroutines, so the event loop never blocks): WAIT waits
   for the release, DIE backs off and retries, the leases renew every
   ttl/3 while the function runs and are released in ``finally``;
4. if the leases could not be had within ``timeout_s``, raises
   :class:`~.errors.KlockConflictError` — or, for tool objects in
   ``tool_error`` mode, returns what the tool layer makes of it.

There is no retry loop here: waiting and back-off live in the engine.
"""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError, LeaseTimeoutError
from klockwork.core.model import Predicate
from klockwork.core.rules import parse_predicate, validate_ttl
from klockwork.integrations.langchain.errors import KlockConflictError, conflict_from_timeout
from klockwork.integrations.langchain.identity import (
    Identity,
    active_call,
    call_session,
    resolve_identity,
)

__all__ = [
    "ON_CONFLICT_MODES",
    "ConflictResult",
    "Extractor",
    "Guard",
    "OnConflict",
    "ResourceSpec",
    "Resources",
    "klock_resolver",
    "make_guard",
    "template_resolver",
]

OnConflict = Literal["tool_error", "raise"]
ON_CONFLICT_MODES: tuple[str, ...] = ("tool_error", "raise")
#: Gets the call's named arguments; returns one ``TYPE:path`` key or several.
Extractor = Callable[[dict[str, Any]], str | Iterable[str] | None]
#: ``"FILE:{path}"``, an :data:`Extractor`, or a list of them (one atomic manifest).
ResourceSpec = str | Extractor | Sequence[str | Extractor]
#: What a tool object returns instead of raising when its own leases are refused.
ConflictResult = Callable[[KlockConflictError], Any]

# Parameters that carry plumbing, not tool input.
_EXCLUDED = frozenset({"self", "cls", "run_manager", "config", "callbacks"})


class Resources(NamedTuple):
    """The resources of one call: the keys to lease, and how the caller named them."""

    keys: list[str]
    label: str


Resolver = Callable[[dict[str, Any]], Resources]


# -- resource specs ---------------------------------------------------------------
class _TemplateError(Exception):
    pass


class _Formatter(string.Formatter):
    """``str.format`` that only takes named arguments, and refuses empty ones."""

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, int):
            raise _TemplateError("positional '{}' fields are not supported; name an argument")
        if key not in kwargs:
            raise _TemplateError(
                f"names {key!r}, which is not an argument of the call "
                f"(arguments: {', '.join(sorted(kwargs)) or 'none'})"
            )
        value = kwargs[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _TemplateError(f"argument {key!r} is empty ({value!r})")
        return value


_FORMATTER = _Formatter()


def template_resolver(spec: ResourceSpec) -> Resolver:
    """Resolver for the short form: templates, extractors, or a list of them.

    A template is formatted with the call's named arguments
    (``"FILE:{path}"``); an extractor gets them as a dict and returns one
    resource key or several. A list makes one atomic manifest.

    Raises:
        InvalidRequestError: the spec is none of these (at decoration time).
    """
    items: list[str | Extractor]
    if isinstance(spec, str) or callable(spec):
        items = [spec]
    elif (
        isinstance(spec, Sequence) and spec and all(isinstance(i, str) or callable(i) for i in spec)
    ):
        items = list(spec)
    else:
        items = []
    if not items:
        raise InvalidRequestError(
            "resource",
            spec,
            "expected a 'TYPE:{argument}' template, a callable returning resource keys, "
            "or a non-empty list of them",
        )
    for item in items:
        if not isinstance(item, str):
            _check_extractor("resource", item)

    plain = {item: _plain_fields(item) for item in items if isinstance(item, str)}

    def resolve(arguments: dict[str, Any]) -> Resources:
        keys: list[str] = []
        for item in items:
            if isinstance(item, str):
                keys.append(_format_fast(item, plain[item], arguments))
            else:
                keys.extend(_extract("resource", item, arguments))
        return Resources(keys, ", ".join(keys))

    return resolve


def _plain_fields(template: str) -> tuple[str, ...] | None:
    """Names of a template's fields when all are plain ``{name}`` (else None)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return None
    return tuple(fields) if all(f.isidentifier() for f in fields) else None


def _format_fast(template: str, fields: tuple[str, ...] | None, arguments: dict[str, Any]) -> str:
    """``str.format_map`` when every field is a plain, present, non-empty argument.

    Anything else goes through :func:`_format`, which explains what is wrong.
    """
    if fields is not None:
        for name in fields:
            value = arguments.get(name)
            if value is None or (type(value) is str and not value.strip()):
                break
        else:
            return template.format_map(arguments)
    return _format(template, arguments)


def klock_resolver(resource_type: str, extractor: Extractor) -> Resolver:
    """Resolver for Klock's signature: ``resource_type`` + ``extractor(kwargs) -> path(s)``.

    Raises:
        InvalidRequestError: ``resource_type`` is not a non-empty string, or
            ``extractor`` is not callable (at decoration time).
    """
    if not isinstance(resource_type, str) or not resource_type.strip():
        raise InvalidRequestError("resource_type", resource_type, "must be a type like 'FILE'")
    _check_extractor("resource_path_extractor", extractor)
    rtype = resource_type.strip()

    def resolve(arguments: dict[str, Any]) -> Resources:
        paths = _extract("resource_path_extractor", extractor, arguments)
        return Resources([f"{rtype}:{path}" for path in paths], ", ".join(paths))

    return resolve


def _check_extractor(argument: str, extractor: object) -> None:
    # An extractor is called with one argument, the call's arguments dict. A
    # tool function handed over by a bare ``@klock_protected`` usually is not.
    if not callable(extractor):
        raise InvalidRequestError(
            argument, extractor, "must be a callable taking the arguments dict"
        )
    try:
        inspect.signature(extractor).bind({})
    except TypeError:
        raise InvalidRequestError(
            argument,
            extractor,
            "must take exactly one argument, the call's arguments dict "
            "(a bare @klock_protected needs a resource: @klock_protected('FILE:{path}'))",
        ) from None
    except ValueError:  # no signature to check (some builtins): trust it
        pass


def _format(template: str, arguments: dict[str, Any]) -> str:
    try:
        return _FORMATTER.vformat(template, (), arguments)
    except _TemplateError as exc:
        raise InvalidRequestError("resource", template, str(exc)) from None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        # e.g. "{user.name}" on an object without .name, or a bad format spec.
        raise InvalidRequestError("resource", template, f"cannot be formatted: {exc!r}") from exc


def _extract(argument: str, extractor: Extractor, arguments: dict[str, Any]) -> list[str]:
    try:
        out = extractor(dict(arguments))  # a copy: the extractor cannot alter the call
    except InvalidRequestError:
        raise
    except Exception as exc:
        raise InvalidRequestError(
            argument, extractor, f"raised {exc!r} for arguments {sorted(arguments)}"
        ) from exc
    values: list[object] = [out] if isinstance(out, str) or out is None else list(out)
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise InvalidRequestError(
            argument, extractor, f"returned {out!r}; expected a non-empty path or a list of them"
        )
    return cast("list[str]", values)


# -- the guard ----------------------------------------------------------------------
class _Call(NamedTuple):
    identity: Identity
    intents: list[tuple[str, Predicate]]
    resources: Resources


@dataclass(frozen=True, slots=True)
class Guard:
    """Validated settings of one protection; wraps functions with :meth:`wrap`."""

    resolver: Resolver
    predicate: Predicate
    kw: Klockwork | None
    agent_id: str | None
    session_id: str | None
    ttl_ms: int
    timeout_s: float | None
    on_conflict: OnConflict

    def engine(self) -> Klockwork:
        """The engine given, else the process-wide default (looked up per call)."""
        return self.kw if self.kw is not None else Klockwork.default()

    def prepare(self, plan: BindPlan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        """Resources, identity and intents of one call; raises before leasing anything."""
        arguments, config = bind_arguments(plan, args, kwargs)
        resources = self.resolver(arguments)
        identity = call_session(
            resolve_identity(config, agent_id=self.agent_id, session_id=self.session_id)
        )
        return _Call(identity, [(key, self.predicate) for key in resources.keys], resources)

    def refused(
        self, call: _Call, exc: LeaseTimeoutError, on_own_conflict: ConflictResult | None
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
    ) -> Callable[..., Any]:
        """Return ``fn`` guarded by this protection (same name, docstring, signature).

        Args:
            fn: a function, coroutine function, or method (``self`` first).
            on_own_conflict: when given, the value a refused call returns
                instead of raising (tool objects use it for ``tool_error``);
                conflicts raised by nested protected calls still propagate.
            asynchronous: force the async wrapper (for callables known to
                return a coroutine that ``inspect`` cannot recognise); by
                default ``inspect.iscoroutinefunction(fn)`` decides.
        """
        plan = bind_plan(fn)

        if asynchronous is None:
            asynchronous = inspect.iscoroutinefunction(fn)
        if asynchronous:
            # The lease must span the awaited body, so the wrapper itself must be
            # a coroutine function: a sync wrapper would release at once.

            @functools.wraps(fn)
            async def aguarded(*args: Any, **kwargs: Any) -> Any:
                call = self.prepare(plan, args, kwargs)
                ident = call.identity
                acquired = False
                try:
                    async with self.engine().leases.ahold(
                        ident.agent_id,
                        ident.session_id,
                        call.intents,
                        self.ttl_ms,
                        timeout_s=self.timeout_s,
                    ):
                        acquired = True
                        with active_call(ident):
                            return await fn(*args, **kwargs)
                except LeaseTimeoutError as exc:
                    if acquired:  # raised by the function itself, not by our acquire
                        raise
                    return self.refused(call, exc, on_own_conflict)

            return aguarded

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            call = self.prepare(plan, args, kwargs)
            ident = call.identity
            acquired = False
            try:
                with self.engine().leases.hold(
                    ident.agent_id,
                    ident.session_id,
                    call.intents,
                    self.ttl_ms,
                    timeout_s=self.timeout_s,
                ):
                    acquired = True
                    with active_call(ident):
                        return fn(*args, **kwargs)
            except LeaseTimeoutError as exc:
                if acquired:
                    raise
                return self.refused(call, exc, on_own_conflict)

        return guarded


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
) -> Guard:
    """Check every option once, at decoration time, and build the :class:`Guard`.

    Raises:
        InvalidRequestError: an option is invalid (named in the message).
    """
    if kw is not None and not isinstance(kw, Klockwork):
        raise InvalidRequestError("kw", kw, "expected a Klockwork engine or None")
    for name, value in (("agent_id", agent_id), ("session_id", session_id)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidRequestError(name, value, "must be a non-empty string or None")
    if timeout_s is not None and (
        isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s < 0
    ):
        raise InvalidRequestError("timeout_s", timeout_s, "must be >= 0 seconds or None")
    if on_conflict not in ON_CONFLICT_MODES:
        raise InvalidRequestError(
            "on_conflict", on_conflict, f"expected one of {', '.join(ON_CONFLICT_MODES)}"
        )
    return Guard(
        resolver=resolver,
        predicate=parse_predicate(predicate),
        kw=kw,
        agent_id=agent_id,
        session_id=session_id,
        ttl_ms=validate_ttl(ttl_ms),
        timeout_s=None if timeout_s is None else float(timeout_s),
        on_conflict=cast("OnConflict", on_conflict),
    )
