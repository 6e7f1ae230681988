"""Protect existing tool objects: :func:`protect_tool` and :func:`protect_tools`.

A protected tool is a copy of the original (``tool.model_copy``) whose work
runs under a :class:`~.guard.Guard`; its name, description, args schema,
``return_direct``, ``response_format``, tags, metadata and error handlers are
the original's, so a model sees exactly the same tool.

What gets guarded:

* ``StructuredTool`` / ``Tool``: the ``func`` and ``coroutine`` of the copy
  are replaced by guarded versions;
* any tool class whose own ``_run`` / ``_arun`` is not LangChain's: the copy
  is an instance of a subclass whose ``_run`` / ``_arun`` are guarded (an
  ``_arun`` left to ``BaseTool`` runs the guarded ``_run`` in a thread).

How a refused call becomes an error ``ToolMessage`` (``on_conflict=
"tool_error"``): LangChain only marks a message ``status="error"`` when a
``ToolException`` meets ``handle_tool_error``; relying on that would force a
handler onto the copy and change how the tool's *other* ``ToolException``\\ s
behave. Instead the copy's class also overrides ``run``/``arun`` to publish
the call's ``tool_call_id`` in a context variable, and the guarded function
answers its own refusal with ``ToolMessage(status="error", tool_call_id=...)``
(LangChain passes a returned ``ToolMessage`` through unchanged, and callbacks
see it in ``on_tool_end`` exactly as with a handled ``ToolException``).
Without a tool call id (``tool.invoke({"path": ...})``) the call returns the
message text, as ``handle_tool_error=True`` would. Every other exception
behaves exactly as in the original tool.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, StructuredTool, Tool
from langchain_core.tools import tool as make_tool

from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError
from klockwork.core.leases.manager import DEFAULT_TTL_MS
from klockwork.core.model import Predicate
from klockwork.integrations.langchain.errors import ToolCallError
from klockwork.integrations.langchain.gating import Metadata, OnDenied, gated_tool
from klockwork.integrations.langchain.guard import ConflictResult, Guard, OnConflict, make_guard
from klockwork.integrations.langchain.resources import ResourceSpec, template_resolver

__all__ = ["DEFAULT_TIMEOUT_S", "protect_tool", "protect_tools", "protect_with_guard"]

#: How long a tool wrapper waits for its leases by default before answering
#: "resource busy" (a model can then try again or do something else).
DEFAULT_TIMEOUT_S = 30.0

_TOOL_CALL_ID: ContextVar[str | None] = ContextVar("klockwork_tool_call_id", default=None)


class _ProtectedTool(BaseTool):
    """Base of protected copies: publishes the running call's ``tool_call_id``."""

    def run(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        token = _TOOL_CALL_ID.set(kwargs.get("tool_call_id"))
        try:
            return super().run(tool_input, *args, **kwargs)
        finally:
            _TOOL_CALL_ID.reset(token)

    async def arun(self, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
        token = _TOOL_CALL_ID.set(kwargs.get("tool_call_id"))
        try:
            return await super().arun(tool_input, *args, **kwargs)
        finally:
            _TOOL_CALL_ID.reset(token)


def protect_tool(
    tool: BaseTool | Callable[..., Any],
    resource: ResourceSpec,
    predicate: str | Predicate = "MUTATES",
    *,
    kw: Klockwork | None = None,
    agent_id: str | None = None,
    session_id: str | None = None,
    ttl_ms: int = DEFAULT_TTL_MS,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    on_conflict: OnConflict = "tool_error",
    gates: str | None = None,
    gate_metadata: Metadata = None,
) -> BaseTool:
    """Return a copy of ``tool`` that holds leases on ``resource`` while it runs.

    Each call leases its resources (WAIT waits for the release, DIE backs
    off and retries), renews them while the tool runs, and releases them
    when it ends, however it ends. The copy keeps the tool's name,
    description, args schema and every other setting; the original is
    left unchanged.

    Args:
        tool: a ``BaseTool``, or a plain function (made a tool with ``@tool``).
        resource: ``"FILE:{path}"`` (formatted with the call's arguments), a
            callable taking the arguments dict and returning one or several
            ``TYPE:path`` keys, or a list of these (one atomic manifest). An
            argument the model chose that makes no usable resource (an empty
            or escaping path) ends the call as an error ``ToolMessage``
            (``tool_error``) or raises :class:`ToolArgumentError`.
        predicate: what the tool does to the resource (``MUTATES``, ``CONSUMES``...).
        kw: the engine; ``Klockwork.default()`` when None.
        agent_id: fixed agent; by default read from the call's config.
        session_id: fixed session; by default read from the call's config.
        ttl_ms: lease TTL; renewed every ttl/3 while the tool runs.
        timeout_s: how long to wait for the leases (None: as long as it takes).
        on_conflict: ``"tool_error"`` — a refused call ends as
            ``ToolMessage(status="error")`` saying who holds what and when it
            frees; ``"raise"`` — it raises :class:`KlockConflictError` (a
            ``ToolException``, so the tool's own ``handle_tool_error`` applies).
        gates: an action to gate each call with first (see
            :func:`~klockwork.integrations.langchain.gating.gated_tool`): the
            gate runs outside the lease, so an approval is waited for (or
            interrupts the graph) before anything is leased; outside a
            checkpointed graph the wait lasts until the approval's stored
            deadline. A denial follows ``on_conflict`` (error message or raise).
        gate_metadata: the gate's metadata (a dict, or a callable of the
            call's arguments).

    Returns:
        The protected copy.

    Raises:
        InvalidRequestError: an invalid option (nothing was wrapped).
    """
    guard = make_guard(
        template_resolver(resource),
        predicate=predicate,
        kw=kw,
        agent_id=agent_id,
        session_id=session_id,
        ttl_ms=ttl_ms,
        timeout_s=timeout_s,
        on_conflict=on_conflict,
    )
    protected = protect_with_guard(_as_tool(tool), guard)
    if gates is None:
        return protected
    on_denied: OnDenied = "tool_error" if on_conflict == "tool_error" else "raise"
    return gated_tool(
        protected,
        action=gates,
        metadata=gate_metadata,
        kw=kw,
        agent_id=agent_id,
        on_denied=on_denied,
    )


def protect_tools(
    tools: Sequence[BaseTool | Callable[..., Any]],
    resource: ResourceSpec | Mapping[str, ResourceSpec],
    predicate: str | Predicate = "MUTATES",
    *,
    kw: Klockwork | None = None,
    agent_id: str | None = None,
    session_id: str | None = None,
    ttl_ms: int = DEFAULT_TTL_MS,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    on_conflict: OnConflict = "tool_error",
) -> list[BaseTool]:
    """Protect several tools at once (see :func:`protect_tool`).

    Args:
        tools: the tools (or plain functions), in order.
        resource: one spec applied to every tool, or a mapping from tool
            name to spec; tools missing from the mapping are returned
            unprotected (as tools), in their place.
        predicate, kw, agent_id, session_id, ttl_ms, timeout_s, on_conflict:
            as for :func:`protect_tool`, shared by every tool.

    Returns:
        The tools in the same order.

    Raises:
        InvalidRequestError: the mapping names a tool that is not in ``tools``
            (a typo would otherwise leave a tool silently unprotected), or an
            option is invalid.
    """
    as_tools = [_as_tool(t) for t in tools]
    if isinstance(resource, Mapping):
        names = {t.name for t in as_tools}
        unknown = sorted(set(resource) - names)
        if unknown:
            raise InvalidRequestError(
                "resource", unknown, f"names no tool in the list (tools: {sorted(names)})"
            )
        specs: list[ResourceSpec | None] = [resource.get(t.name) for t in as_tools]
    else:
        specs = [resource] * len(as_tools)
    options: dict[str, Any] = {
        "kw": kw,
        "agent_id": agent_id,
        "session_id": session_id,
        "ttl_ms": ttl_ms,
        "timeout_s": timeout_s,
        "on_conflict": on_conflict,
    }
    return [
        t if spec is None else protect_tool(t, spec, predicate, **options)
        for t, spec in zip(as_tools, specs, strict=True)
    ]


def protect_with_guard(tool: BaseTool, guard: Guard) -> BaseTool:
    """Return a protected copy of ``tool`` running under ``guard`` (see module docstring)."""
    handler = _refusal_result(tool) if guard.on_conflict == "tool_error" else None
    cls = type(tool)
    namespace: dict[str, Any] = {}
    update: dict[str, Any] = {}
    wrap = functools.partial(guard.wrap, on_own_conflict=handler, tool_name=tool.name)
    if not _langchain_impl(cls._run):
        namespace["_run"] = wrap(cls._run)
    elif isinstance(tool, (StructuredTool, Tool)) and tool.func is not None:
        update["func"] = wrap(tool.func)
    if not _langchain_impl(cls._arun):
        namespace["_arun"] = wrap(cls._arun, asynchronous=True)
    elif isinstance(tool, (StructuredTool, Tool)) and tool.coroutine is not None:
        update["coroutine"] = wrap(tool.coroutine, asynchronous=True)
    if not namespace and not update:
        raise InvalidRequestError(
            "tool", tool, "has neither a function nor its own _run/_arun to protect"
        )
    copy: BaseTool = tool.model_copy(update=update)  # (Self is Any to mypy on 3.10)
    # Switching the class of a copy (same fields, same layout) keeps every
    # field and private attribute as model_copy left them; a subclass adds
    # only methods.
    object.__setattr__(copy, "__class__", _protected_class(cls, namespace))
    return copy


def _refusal_result(tool: BaseTool) -> ConflictResult:
    name = tool.name
    with_artifact = tool.response_format == "content_and_artifact"

    def result(error: ToolCallError) -> Any:
        call_id = _TOOL_CALL_ID.get()
        out: Any = (
            str(error)
            if call_id is None
            else ToolMessage(str(error), tool_call_id=call_id, name=name, status="error")
        )
        # content_and_artifact tools must return a pair; a ToolMessage content
        # is passed through by LangChain either way.
        return (out, None) if with_artifact else out

    return result


def _langchain_impl(method: object) -> bool:
    """True for LangChain's own ``_run``/``_arun`` (they call ``func``/``coroutine``)."""
    return str(getattr(method, "__module__", "")).startswith("langchain_core.")


_CLASS_CACHE: dict[type[BaseTool], type[BaseTool]] = {}
_CLASS_LOCK = threading.Lock()


def _protected_class(cls: type[BaseTool], namespace: dict[str, Any]) -> type[BaseTool]:
    if issubclass(cls, _ProtectedTool) and not namespace:
        return cls
    if not namespace:  # only run/arun are added: one subclass per tool class will do
        with _CLASS_LOCK:
            cached = _CLASS_CACHE.get(cls)
            if cached is None:
                cached = _CLASS_CACHE[cls] = _subclass(cls, namespace)
            return cached
    return _subclass(cls, namespace)


def _subclass(cls: type[BaseTool], namespace: dict[str, Any]) -> type[BaseTool]:
    bases = (cls,) if issubclass(cls, _ProtectedTool) else (_ProtectedTool, cls)
    name = cls.__name__ if cls.__name__.startswith("Protected") else f"Protected{cls.__name__}"
    return type(name, bases, {"__module__": __name__, **namespace})


def _as_tool(obj: BaseTool | Callable[..., Any]) -> BaseTool:
    if isinstance(obj, BaseTool):
        return obj
    if callable(obj):
        return make_tool(obj)
    raise InvalidRequestError("tool", obj, "expected a BaseTool or a function")
