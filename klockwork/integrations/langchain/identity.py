"""Who is calling: the agent and session a protected tool call leases as.

Leases belong to an *agent* (whose age decides wait-die) and a *session*
(the same agent in the same session is reentrant; in another session it is
a separate claimant). A tool rarely receives either as an argument, so the
wrappers read them from the LangChain config of the call — which
:func:`langchain_core.runnables.ensure_config` returns inside any tool run,
because ``BaseTool.run`` sets the child config in a context variable before
it calls the tool's function.

Resolution order (first hit wins), see :func:`resolve_identity`:

==========  ===========================================================
agent       explicit argument → ``configurable["agent_id"]`` →
            ``metadata["agent_id"]`` → LangGraph runtime context
            ``agent_id`` → ``metadata["lc_agent_name"]`` → ``process-<pid>``
session     explicit argument → ``configurable["session_id"]`` →
            ``metadata["session_id"]`` → runtime context ``session_id`` →
            ``configurable["thread_id"]`` → ``metadata["thread_id"]`` →
            the enclosing protected call of the same agent → a fresh id
==========  ===========================================================

A fresh session per call is what keeps concurrent anonymous calls apart:
they share the agent ``process-<pid>`` but not a session, so they exclude
each other instead of being reentrant.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import threading
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple, cast

from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.runnables.config import CONFIG_KEYS, var_child_runnable_config
from langgraph.runtime import Runtime, get_runtime

from klockwork.core.errors import InvalidRequestError
from klockwork.core.leases.rules import within_session
from klockwork.core.validation import check_identity

__all__ = ["Identity", "agent_config", "resolve_identity"]

AGENT_KEY = "agent_id"
SESSION_KEY = "session_id"


class Identity(NamedTuple):
    """The agent and session a call leases as, and where each came from.

    ``agent_source`` is one of ``argument configurable metadata runtime
    lc_agent_name anonymous``; ``session_source`` one of ``argument
    configurable metadata runtime thread_id enclosing fresh``.
    """

    agent_id: str
    session_id: str
    agent_source: str
    session_source: str


def agent_config(agent_id: str, session_id: str | None = None, **extra: Any) -> RunnableConfig:
    """Build a ``RunnableConfig`` that tells protected tools who is calling.

    Identity goes into both ``configurable`` (what tools read) and
    ``metadata`` (what callbacks see: LangGraph does not pass custom
    ``configurable`` keys to callbacks).

    Args:
        agent_id: the agent's id (its registered age decides wait-die).
        session_id: the agent's session; calls in the same session are
            reentrant. When omitted, the session falls back to ``thread_id``
            and then to a fresh id per call.
        **extra: further ``configurable`` entries, e.g. ``thread_id="t1"``.

    Returns:
        A config to pass as ``tool.invoke(args, config=...)`` or
        ``graph.invoke(state, config=...)``.

    Raises:
        InvalidRequestError: ``agent_id`` (or a given ``session_id``) is not
            a non-empty string.
    """
    _check_id(AGENT_KEY, agent_id)
    ids: dict[str, Any] = {AGENT_KEY: agent_id}
    if session_id is not None:
        _check_id(SESSION_KEY, session_id)
        ids[SESSION_KEY] = session_id
    return RunnableConfig(configurable={**extra, **ids}, metadata=dict(ids))


def resolve_identity(
    config: RunnableConfig | Mapping[str, Any] | None = None,
    *,
    agent_id: str | None = None,
    session_id: str | None = None,
) -> Identity:
    """Decide the agent and session of a call (see the module docstring for the order).

    Never fails for lack of identity: with none anywhere the call runs as
    agent ``process-<pid>`` in a fresh session of its own.

    Args:
        config: the call's config; merged over the current runnable context
            (``ensure_config``), so ``None`` reads the context alone.
        agent_id: wins over everything in the config when given.
        session_id: wins over everything in the config when given.

    Returns:
        The :class:`Identity`, with where each part came from.

    Raises:
        InvalidRequestError: an explicit id is given but is not a non-empty string.
    """
    if agent_id is not None:
        _check_id(AGENT_KEY, agent_id)
    if session_id is not None:
        _check_id(SESSION_KEY, session_id)
    plain = _plain_identity(config, agent_id, session_id)
    if plain is not None:
        return plain
    # Inside a tool run the config is the context's own (BaseTool.run sets it):
    # read it as is instead of copying it through ensure_config on every call.
    cfg: Mapping[str, Any] = (
        (var_child_runnable_config.get() or {})
        if config is None
        else ensure_config(_as_config(config))
    )
    configurable: Mapping[str, Any] = cfg.get("configurable") or {}
    metadata: Mapping[str, Any] = cfg.get("metadata") or {}
    # Sources are looked at in order and only as far as needed: the LangGraph
    # runtime lookup is the costly one, and most calls never reach it.
    context: object = _UNSET

    agent: str | None
    agent, agent_source = agent_id, "argument"
    if not agent:
        agent, agent_source = _text(configurable.get(AGENT_KEY)), "configurable"
    if not agent:
        agent, agent_source = _text(metadata.get(AGENT_KEY)), "metadata"
    if not agent:
        context = _runtime_context(configurable)
        agent, agent_source = _text(_lookup(context, AGENT_KEY)), "runtime"
    if not agent:
        agent, agent_source = _text(metadata.get("lc_agent_name")), "lc_agent_name"
    if not agent:
        agent, agent_source = f"process-{os.getpid()}", "anonymous"

    session: str | None
    session, session_source = session_id, "argument"
    if not session:
        session, session_source = _text(configurable.get(SESSION_KEY)), "configurable"
    if not session:
        session, session_source = _text(metadata.get(SESSION_KEY)), "metadata"
    if not session:
        if context is _UNSET:
            context = _runtime_context(configurable)
        session, session_source = _text(_lookup(context, SESSION_KEY)), "runtime"
    if not session:
        session = _text(_thread_id(configurable.get("thread_id")))
        session = session or _text(_thread_id(metadata.get("thread_id")))
        session_source = "thread_id"
    if session is None:
        session = _enclosing_session(agent)
        session_source = "enclosing"
    if session is None:
        session, session_source = _new_call_id(), "fresh"
    return Identity(agent, session, agent_source, session_source)


# -- the enclosing call ---------------------------------------------------------
# A protected call that runs another protected call (a decorated function
# inside a protected tool, or a tool protected twice) must be reentrant with
# it, or it would wait for itself. With no session in the config each call
# would get a fresh session, so the inner call borrows the outer one's — but
# only on the same thread and asyncio task: parallel tool calls started from
# inside a protected call inherit its context too, and must still exclude
# each other.
_ACTIVE: ContextVar[tuple[str, str, tuple[int, int]] | None] = ContextVar(
    "klockwork_active_call", default=None
)


def _owner() -> tuple[int, int]:
    # _get_running_loop() returns None outside a loop; current_task() would
    # raise there, and raising costs more than the whole lookup.
    loop = asyncio._get_running_loop()
    task = asyncio.current_task(loop) if loop is not None else None
    return threading.get_ident(), id(task) if task is not None else 0


def call_session(identity: Identity) -> Identity:
    """The identity one protected call leases as: its own sub-session.

    Parallel calls of one agent usually share a session (the graph's
    ``thread_id``, or the session in ``agent_config``); leasing in that session
    would make them reentrant with each other, so two parallel edits of one
    file would both be granted. Each call therefore leases in a sub-session
    ``<session>/call-<n>``: reentrant with what the session itself holds,
    exclusive with its siblings. A protected call made inside another one of
    the same agent (same thread or task) reuses the outer call's sub-session,
    so it never waits for itself.
    """
    enclosing = _enclosing_session(identity.agent_id)
    if enclosing is not None and within_session(enclosing, identity.session_id):
        return identity._replace(session_id=enclosing, session_source="enclosing")
    if identity.session_source in ("fresh", "enclosing"):
        return identity  # already this call's own
    return identity._replace(session_id=f"{identity.session_id}/{_new_call_id()}")


# Call ids must be unique across every process sharing a store, and cheap: a
# random per-process token (48 bits) and a counter. A forked child gets a new
# token, or it would hand out its parent's ids and share its sessions.
_process_token = secrets.token_hex(6)
_calls = itertools.count(1)


def _new_call_id() -> str:
    return f"call-{_process_token}-{next(_calls)}"


def _after_fork() -> None:
    global _process_token, _calls
    _process_token = secrets.token_hex(6)
    _calls = itertools.count(1)


os.register_at_fork(after_in_child=_after_fork)


def _enclosing_session(agent_id: str) -> str | None:
    active = _ACTIVE.get()
    if active is not None and active[0] == agent_id and active[2] == _owner():
        return active[1]
    return None


class active_call:
    """Mark ``identity`` as the protected call running in this thread/task."""

    __slots__ = ("_identity", "_token")

    def __init__(self, identity: Identity) -> None:
        self._identity = identity

    def __enter__(self) -> None:
        ident = self._identity
        self._token = _ACTIVE.set((ident.agent_id, ident.session_id, _owner()))

    def __exit__(self, *_: object) -> None:
        _ACTIVE.reset(self._token)


# -- helpers ----------------------------------------------------------------------
def _as_config(config: RunnableConfig | Mapping[str, Any] | None) -> RunnableConfig | None:
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise InvalidRequestError("config", config, "expected a RunnableConfig (a dict) or None")
    return cast("RunnableConfig", dict(config))


def _runtime_context(configurable: Mapping[str, Any]) -> object:
    """The LangGraph runtime context of the current graph run, or None outside one."""
    # LangGraph keeps the Runtime in the run's configurable; finding it by type
    # also works for an explicit config. get_runtime() is the documented path
    # for the current context and raises outside any runnable.
    for value in configurable.values():
        if isinstance(value, Runtime):
            return value.context
    try:
        runtime = get_runtime()
    except Exception:  # outside a graph there is simply no runtime
        return None
    return runtime.context if isinstance(runtime, Runtime) else None


def _lookup(context: object, key: str) -> object:
    if context is None:
        return None
    if isinstance(context, Mapping):
        return context.get(key)
    return getattr(context, key, None)


def _thread_id(value: object) -> object:
    # LangGraph accepts non-string thread ids (ints, UUIDs); a session is a string.
    if isinstance(value, (int, uuid.UUID)) and not isinstance(value, bool):
        return str(value)
    return value


_UNSET = object()


_CONFIG_KEYS = frozenset(CONFIG_KEYS)


def _plain_identity(
    config: object, agent_id: str | None, session_id: str | None
) -> Identity | None:
    """The identity of the usual call, read without ``ensure_config``; None: merge and look.

    The usual call (``agent_config()``) has both ids in its config's own
    ``configurable``, which ``ensure_config`` would keep as they are: a given
    ``configurable`` replaces the context's, and only keys outside
    ``CONFIG_KEYS`` are moved into it.
    """
    if config.__class__ is not dict:
        return None
    plain = cast("dict[str, Any]", config)
    if not plain.keys() <= _CONFIG_KEYS:
        return None
    own = plain.get("configurable")
    if own.__class__ is not dict:
        return None
    ids = cast("dict[str, Any]", own)
    agent = agent_id or _text(ids.get(AGENT_KEY))
    session = session_id or _text(ids.get(SESSION_KEY))
    if not (agent and session):
        return None
    return Identity(
        agent,
        session,
        "argument" if agent_id else "configurable",
        "argument" if session_id else "configurable",
    )


def _text(value: object) -> str | None:
    """``value`` if it is a non-empty string (a usable id), else None."""
    return value if isinstance(value, str) and value else None


def _check_id(argument: str, value: object) -> str:
    return check_identity(value, argument)
