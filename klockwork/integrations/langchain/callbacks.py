"""Audit callbacks: LangChain and LangGraph runs recorded in klockwork's audit trail.

::

    from klockwork.integrations.langchain import AuditCallbackHandler, audit_context

    graph.invoke(state, config={"callbacks": [AuditCallbackHandler(kw)], ...})

    with audit_context(kw, redact={"api_key"}):     # every run inside the block
        graph.invoke(state)
        await other_graph.ainvoke(state)

Each run event becomes one entry of ``kw.audit`` (hash-chained, verifiable
with ``kw.audit.verify()`` or ``klockwork audit verify FILE`` on an export):

===============  =============================================================
kind             recorded when, and its data
===============  =============================================================
``tool.start``   a tool starts: ``tool``, ``tool_call_id``, ``inputs``
``tool.end``     it returns: ``tool``, ``outputs``
``tool.error``   it raises: ``tool``, ``error`` ({``type``, ``message``})
``chain.start``  a graph, graph node or chain starts: ``name``, ``inputs``
``chain.end``    it returns (``outputs``) or fails (``error``)
``llm.end``      a chat model (or LLM) answers: ``model``, ``outputs`` (the
                 message as a dict), ``usage`` (token usage, when the model
                 reports it); or fails: ``error``
===============  =============================================================

Every entry's data also has ``run_id`` and, when known, ``parent_run_id``,
``thread_id`` and ``langgraph_node`` (keys whose value is unknown are left
out). The entry's ``agent_id`` is ``metadata["agent_id"]``, else
``metadata["lc_agent_name"]`` (``create_agent(name=...)``), else
``process-<pid>`` as for leases; its ``session_id`` is
``metadata["session_id"]``, else the ``thread_id``, else none. Callbacks only
see the run's *metadata* (LangGraph does not pass ``configurable`` to them):
:func:`~klockwork.integrations.langchain.agent_config` puts identity there.

Where the audit kinds leave a gap: there is no ``chain.error`` kind, so a
chain that fails is a ``chain.end`` whose data has ``error`` instead of
``outputs``; LangGraph's control flow exceptions (an ``interrupt()``, a
command to the parent graph) are recorded the same way plus
``"interrupted": true``. A failed model call is likewise an ``llm.end`` with
``error``. A model's start is not recorded (there is no ``llm.start``): its
``llm.end`` carries the run ids, and the entries' ``ts`` give durations.

Inputs and outputs become small JSON data on the calling thread
(:mod:`~klockwork.integrations.langchain.audit_shape`): ``redact`` runs
first, then each field keeps at most ``max_field_chars`` characters of text,
from the beginning, with a truncation marker.

Failures: recording never breaks the run by default — a failed record (a
closed engine, a failed audit store, a redaction callable that raises) is
counted in :attr:`AuditCallbackHandler.failures`, logged once, and the run
goes on. With ``fail_closed=True`` the error is raised from the callback and
LangChain propagates it (``raise_error``): no run goes unaudited (for
:class:`AsyncAuditCallbackHandler`, only on async code paths: see there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.tracers.context import register_configure_hook
from langgraph.errors import GraphBubbleUp

from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError
from klockwork.integrations.langchain.audit_shape import REDACTED, Redactor, Shaper, redaction
from klockwork.integrations.langchain.identity import AGENT_KEY, SESSION_KEY, _text, _thread_id

__all__ = [
    "REDACTED",
    "AsyncAuditCallbackHandler",
    "AuditCallbackHandler",
    "AuditContext",
    "audit_context",
]

logger = logging.getLogger("klockwork.audit")

_MAX_RUNS = 100_000  # started runs remembered until they end (bounded against leaks)
_EMPTY: Mapping[str, Any] = {}


# --------------------------------------------------------------------------- the logic
# The data every entry of a run shares (run ids, name, thread, node) and its identity.
_Run = tuple[dict[str, Any], str | None, str | None]
_UNKNOWN: _Run = ({}, None, None)


class _AuditCore(BaseCallbackHandler):
    """What both handlers do, written once (their ``on_*`` methods are these).

    Thread-safe: LangChain calls sync handlers from worker threads. The only
    shared state is the dict of started runs (single ``dict`` operations,
    atomic) and the failure counter (under a lock). Nothing here blocks:
    ``kw.audit.record`` only queues the entry.
    """

    run_inline = True  # cheap and non-blocking: no executor hop, no task per event
    # Read by LangChain on every event: plain attributes, set per instance below
    # (tool events are governed by ignore_agent, which stays False).
    ignore_llm: bool = False
    ignore_chat_model: bool = False
    ignore_chain: bool = False
    ignore_retriever: bool = True
    ignore_retry: bool = True
    ignore_custom_event: bool = True

    def __init__(
        self,
        kw: Klockwork | None = None,
        *,
        redact: Redactor | Iterable[str] | None = None,
        max_field_chars: int = 2000,
        fail_closed: bool = False,
        record_llm: bool = True,
        record_chains: bool = True,
    ) -> None:
        if kw is not None and not isinstance(kw, Klockwork):
            raise InvalidRequestError("kw", kw, "expected a Klockwork engine or None")
        if max_field_chars.__class__ is not int or max_field_chars < 1:
            raise InvalidRequestError("max_field_chars", max_field_chars, "must be an int >= 1")
        keys, fn = redaction(redact)
        self._kw = kw
        self._default: Klockwork | None = None
        self._rec: Callable[[str, str | None, str | None, Any], int] | None = None
        self._shape = Shaper(max_field_chars, keys, fn).shape
        self.max_field_chars = max_field_chars
        self.fail_closed = fail_closed
        self.raise_error = fail_closed  # LangChain re-raises our errors only then
        self.record_llm = record_llm
        self.record_chains = record_chains
        self.ignore_llm = self.ignore_chat_model = not record_llm
        self.ignore_chain = not record_chains
        self._runs: dict[int, _Run] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self._last_error: BaseException | None = None

    @property
    def failures(self) -> int:
        """How many events could not be recorded (or were recorded with a field missing)."""
        return self._failures

    @property
    def last_error(self) -> BaseException | None:
        """The most recent recording failure, if any."""
        return self._last_error

    @property
    def kw(self) -> Klockwork:
        """The engine entries go to (``Klockwork.default()`` unless one was given)."""
        if self._kw is not None:
            return self._kw
        kw = self._default
        if kw is None or kw.closed:
            kw = self._default = Klockwork.default()
            self._rec = None
        return kw

    # ----------------------------------------------------------------- plumbing
    def _record(self, kind: str, agent: str | None, session: str | None, data: Any) -> None:
        rec = self._rec
        default = self._default
        if rec is None or (default is not None and default.closed):
            rec = self._rec = self.kw.audit.record
        rec(kind, agent, session, data)

    def _failed(self, exc: BaseException) -> None:
        """Count a failure; raise it when failing closed (call from an ``except`` block)."""
        with self._lock:
            seen = exc is self._last_error  # raised by _field, caught again by the caller
            if not seen:
                self._failures += 1
                self._last_error = exc
            first = not seen and self._failures == 1
        if self.fail_closed:
            raise exc
        if first:
            logger.warning(
                "klockwork audit callback could not record an event (%r); the run goes on "
                "(fail_closed=False). Further failures are only counted in handler.failures.",
                exc,
            )

    def _field(self, value: Any, path: str) -> Any:
        try:
            return self._shape(value, path)
        except Exception as exc:  # a redactor that raises: never record the raw value
            self._failed(exc)
            return f"[unavailable: {type(exc).__name__}]"

    def _start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        name_key: str,
        name: Any,
        md: Mapping[str, Any] | None,
    ) -> _Run:
        """Remember a started run: its shared data and identity (end events get no metadata).

        Runs are keyed by ``UUID.int``: ``UUID.__hash__`` is Python code.
        """
        runs = self._runs
        if len(runs) >= _MAX_RUNS:  # runs that never ended (cancelled): forget the oldest
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del runs[next(iter(runs))]
        base: dict[str, Any] = {"run_id": str(run_id), name_key: name}
        if parent_run_id is not None:
            parent = runs.get(parent_run_id.int)
            base["parent_run_id"] = (
                parent[0]["run_id"] if parent is not None else str(parent_run_id)
            )
        agent: Any = None
        session: Any = None
        if md:
            thread = md.get("thread_id")
            if thread is not None:
                if thread.__class__ is not str or not thread:
                    thread = _text(_thread_id(thread))
                if thread is not None:
                    base["thread_id"] = thread
            node = md.get("langgraph_node")
            if node is not None:
                base["langgraph_node"] = node
            agent = md.get(AGENT_KEY)
            if agent.__class__ is not str or not agent:
                agent = _text(md.get("lc_agent_name"))
            session = md.get(SESSION_KEY)
            if session.__class__ is not str or not session:
                session = thread
        run = runs[run_id.int] = (base, agent or f"process-{os.getpid()}", session)
        return run

    # ----------------------------------------------------------------- events
    # These have LangChain's signatures: AuditCallbackHandler uses them as its
    # on_* methods as they are, AsyncAuditCallbackHandler calls them from its
    # coroutines. End events carry no metadata: they reuse the start's data.
    def _on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            name = (serialized.get("name") if serialized else None) or kwargs.get("name")
            base, agent, session = self._start(run_id, parent_run_id, "tool", name, metadata)
            data = base.copy()
            call_id = kwargs.get("tool_call_id")
            if call_id is not None:
                data["tool_call_id"] = call_id
            data["inputs"] = self._field(input_str if inputs is None else inputs, "inputs")
            self._record("tool.start", agent, session, data)
        except Exception as exc:
            self._failed(exc)

    def _on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end("tool.end", run_id, output, None)

    def _on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end("tool.error", run_id, None, error)

    def _on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            name = kwargs.get("name") or (serialized.get("name") if serialized else None)
            base, agent, session = self._start(run_id, parent_run_id, "name", name, metadata)
            data = base.copy()
            data["inputs"] = self._field(inputs, "inputs")
            self._record("chain.start", agent, session, data)
        except Exception as exc:
            self._failed(exc)

    def _on_chain_end(self, outputs: dict[str, Any], *, run_id: UUID, **kwargs: Any) -> None:
        self._end("chain.end", run_id, outputs, None)

    def _on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end("chain.end", run_id, None, error)

    def _on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_start(serialized, run_id, parent_run_id, metadata, kwargs)

    def _on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_start(serialized, run_id, parent_run_id, metadata, kwargs)

    def _model_start(
        self,
        serialized: dict[str, Any] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        """Not recorded (there is no such kind): remembered for ``llm.end``."""
        try:
            model = (
                (metadata.get("ls_model_name") if metadata else None)
                or kwargs.get("name")
                or (serialized.get("name") if serialized else None)
            )
            self._start(run_id, parent_run_id, "model", model, metadata)
        except Exception as exc:
            self._failed(exc)

    def _on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self._end("llm.end", run_id, response, None)

    def _on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end("llm.end", run_id, None, error)

    def _end(self, kind: str, run_id: UUID, result: Any, error: BaseException | None) -> None:
        try:
            base, agent, session = self._runs.pop(run_id.int, _UNKNOWN)
            data: dict[str, Any] = base.copy() if base else {"run_id": str(run_id)}
            if error is not None:
                data["error"] = {
                    "type": type(error).__name__,
                    "message": self._field(str(error), "error.message"),
                }
                if isinstance(error, GraphBubbleUp):  # LangGraph control flow, not a failure
                    data["interrupted"] = True
            elif kind == "llm.end":
                self._llm_result(result, data)
            else:
                data["outputs"] = self._field(result, "outputs")
            self._record(kind, agent, session, data)
        except Exception as exc:
            self._failed(exc)

    def _llm_result(self, response: LLMResult, data: dict[str, Any]) -> None:
        outputs: list[Any] = []
        usage: Any = None
        for generations in response.generations:
            for generation in generations:
                message = getattr(generation, "message", None)
                outputs.append(generation.text if message is None else message)
                if usage is None and message is not None:
                    usage = getattr(message, "usage_metadata", None)
        if usage is None and response.llm_output:
            usage = response.llm_output.get("token_usage")
        data["outputs"] = self._field(outputs[0] if len(outputs) == 1 else outputs, "outputs")
        if usage is not None:
            data["usage"] = self._field(usage, "usage")


# --------------------------------------------------------------------------- handlers
class AuditCallbackHandler(_AuditCore):
    """Records tool, chain and chat-model runs in ``kw.audit`` (see the module docstring).

    Pass it as ``config={"callbacks": [handler]}`` (or use :func:`audit_context`).
    It works in sync and async runs alike: it is ``run_inline``, so in an
    async run LangChain calls it on the event loop, which is fine because
    recording never blocks.

    Args:
        kw: the engine whose audit trail records; ``Klockwork.default()``
            (resolved at the first event, again if that engine gets closed) when None.
        redact: a callable ``(path, value) -> value`` applied to every value
            of inputs, outputs, usage and error messages before it is
            recorded (``path`` is dotted: ``"inputs.messages.0.content"``),
            or key names (case-insensitive) whose values are replaced with
            ``"[redacted]"`` wherever they occur.
        max_field_chars: characters of text kept per field (inputs, outputs,
            usage, error message), from the beginning, with a truncation marker.
        fail_closed: raise (and so fail the run) when an event cannot be
            recorded; by default failures are counted and the run goes on.
        record_llm: record ``llm.end`` for chat models and LLMs.
        record_chains: record ``chain.start``/``chain.end`` (graphs, nodes,
            chains); tools are always recorded.

    Raises:
        InvalidRequestError: a bad ``kw``, ``redact`` or ``max_field_chars``.
    """

    on_tool_start = _AuditCore._on_tool_start
    on_tool_end = _AuditCore._on_tool_end
    on_tool_error = _AuditCore._on_tool_error
    on_chain_start = _AuditCore._on_chain_start
    on_chain_end = _AuditCore._on_chain_end
    on_chain_error = _AuditCore._on_chain_error
    on_chat_model_start = _AuditCore._on_chat_model_start
    on_llm_start = _AuditCore._on_llm_start
    on_llm_end = _AuditCore._on_llm_end
    on_llm_error = _AuditCore._on_llm_error


class AsyncAuditCallbackHandler(_AuditCore, AsyncCallbackHandler):
    """The ``AsyncCallbackHandler`` twin of :class:`AuditCallbackHandler` (same arguments).

    Its coroutines record directly and never await: recording only queues the
    entry, so the event loop is never blocked.

    LangChain drives async handlers from sync code — a sync run, or a sync
    tool's ``ainvoke``, which runs the whole tool call on a worker thread —
    by running their coroutines on a new event loop per event, and there it
    logs and swallows their errors whatever ``raise_error`` says. Events are
    still recorded, but ``fail_closed=True`` only holds for async code paths.
    :class:`AuditCallbackHandler` has neither limit and serves async runs too
    (it is called inline on the loop), so prefer it when sync tools are involved.
    """

    async def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
        self._on_tool_start(*args, **kwargs)

    async def on_tool_end(self, *args: Any, **kwargs: Any) -> None:
        self._on_tool_end(*args, **kwargs)

    async def on_tool_error(self, *args: Any, **kwargs: Any) -> None:
        self._on_tool_error(*args, **kwargs)

    async def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        self._on_chain_start(*args, **kwargs)

    async def on_chain_end(self, *args: Any, **kwargs: Any) -> None:
        self._on_chain_end(*args, **kwargs)

    async def on_chain_error(self, *args: Any, **kwargs: Any) -> None:
        self._on_chain_error(*args, **kwargs)

    async def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], **kwargs: Any
    ) -> None:
        self._on_chat_model_start(serialized, messages, **kwargs)

    async def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        self._on_llm_start(*args, **kwargs)

    async def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        self._on_llm_end(*args, **kwargs)

    async def on_llm_error(self, *args: Any, **kwargs: Any) -> None:
        self._on_llm_error(*args, **kwargs)


# --------------------------------------------------------------------------- audit_context
# LangChain consults registered context variables whenever it configures a
# run's callbacks (the mechanism behind tracing_v2_enabled): a handler set
# here joins every run started in this context — sync code, worker threads
# LangChain starts (they copy the context) and asyncio tasks alike — and is
# inherited by child runs; LangChain adds it only once per run.
_CONTEXT_HANDLER: ContextVar[AuditCallbackHandler | None] = ContextVar(
    "klockwork_audit_handler", default=None
)
register_configure_hook(_CONTEXT_HANDLER, inheritable=True)


class AuditContext:
    """The context manager :func:`audit_context` returns (``with`` or ``async with``)."""

    def __init__(self, handler: AuditCallbackHandler) -> None:
        self.handler = handler
        self._tokens: list[Token[AuditCallbackHandler | None]] = []

    def __enter__(self) -> AuditCallbackHandler:
        self._tokens.append(_CONTEXT_HANDLER.set(self.handler))
        return self.handler

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _CONTEXT_HANDLER.reset(self._tokens.pop())

    async def __aenter__(self) -> AuditCallbackHandler:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def audit_context(kw: Klockwork | None = None, **handler_options: Any) -> AuditContext:
    """Audit every LangChain/LangGraph run started inside a ``with`` block.

    ::

        with audit_context(kw, redact={"password"}) as handler:
            agent.invoke({"messages": [...]}, config=agent_config("writer"))
            await graph.ainvoke(state)
        print(handler.failures)

    Runs started in the block — sync or async, and the worker threads and
    tasks they start — get one :class:`AuditCallbackHandler` built from
    ``kw`` and ``handler_options`` (its arguments); runs already started
    outside are not affected. Blocks nest: the innermost handler wins. Do not
    also pass an audit handler in ``callbacks``, or each event is recorded twice.

    Raises:
        InvalidRequestError: bad handler options.
    """
    return AuditContext(AuditCallbackHandler(kw, **handler_options))
