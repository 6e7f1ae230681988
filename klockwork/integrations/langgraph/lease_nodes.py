"""Leases across nodes: :func:`lease_node`, :func:`release_node`, :func:`leases_released`.

::

    builder.add_node("lease", lease_node(kw, ("FILE:/repo/auth", "MUTATES")))
    builder.add_node("edit", edit)  # reads state["klockwork_leases"][...]["fencing_token"]
    builder.add_node("release", release_node(kw))
    with leases_released(kw):  # released however the run ends
        graph.invoke(inputs, config)

**State.** The nodes read and write ``klockwork_leases`` (:data:`LEASES_KEY`):
``{resource: entry}``, the resource normalised (``FILE:/repo/auth``), each
entry a JSON dict ``{"lease_id", "resource", "predicate", "fencing_token",
"acquired_at", "expires_at", "ttl_ms", "agent_id", "session_id",
"reacquired", "previous_token"}`` (``expires_at`` as granted: the renewer
extends the lease without writing the state; ``reacquired`` counts the
re-acquisitions after a loss, ``previous_token`` is the token before the
last one). Declare the key with its reducer :func:`merge_leases` (or
subclass :class:`LeasesState`): updates merge per resource and ``None``
removes one, so several lease nodes compose, in sequence or in parallel.

**Identity.** The leases belong to the run's agent and session
(:func:`~klockwork.integrations.langchain.resolve_identity`: the session is
the ``thread_id`` unless the config names one). The run's own tools, which
lease in that session or a sub-session of it, never conflict with them
(reentrancy); other runs do, and wait (wait-die) up to ``timeout_s``.

**Waiting.** :func:`lease_node` acquires all the missing leases at once (one
manifest: all or none), blocking like ``kw.leases.acquire`` (``ainvoke``
waits without blocking the loop). Not granted within ``timeout_s`` (default:
wait as long as needed) raises :class:`~klockwork.LeaseTimeoutError` and
the node fails: the step can be retried by resuming the thread.

**Renewal.** A lease taken or found by a lease node is renewed every ttl/3
by the engine's one renewer thread, until :func:`release_node` releases it,
the enclosing :func:`leases_released` block ends, or the engine closes.

**The end of the run.** :func:`release_node` releases the leases when the
graph reaches it. A run that fails, or stops at an interrupt, never reaches
it: run the graph inside ``with leases_released(kw):`` (``async with`` for
``ainvoke``), which releases, when the block ends for whatever reason,
every lease that lease nodes took or kept inside it and that is still held.
A context manager rather than a callback or a graph wrapper, because it
covers ``invoke``, ``stream``, their async twins and several calls in a
row alike, and an exception is exactly what it sees. It releases at an
interrupt too: a paused run waits for a person for an unbounded time, and
holding its leases (renewed by a process that may not even be alive when the
answer comes) would stall every other agent that long. Without the block,
the leases of a failed run are renewed until the engine closes: release
them with ``release_node(kw).invoke(graph.get_state(config).values)``.

**Resume.** A lease in the state that is no longer active when a lease node
checks it (released at a pause, expired while the process was gone, revoked)
is **re-acquired** by default: the resource was only ever leased to keep
others out while this run works, and the run is about to work again; the
new entry says so (new ``fencing_token``, ``reacquired`` + 1,
``previous_token``), so a write that must not follow someone else's can
compare tokens or call ``kw.leases.check_fencing``. With
``on_lost="fail"`` the node raises :class:`~klockwork.LeaseLostError`
instead (for work that cannot restart on a resource someone else may have
changed). Only a lease node checks, so a node that resumes after a pause
and needs the leases first calls :func:`ensure_leases` (or
:func:`aensure_leases`) with its state and merges what it returns into its
update; a resumed run re-enters such a node from its start.

**Re-runs.** A lease node run again for the same step (LangGraph re-runs a
node that was interrupted or failed) grants nothing twice: a lease already
in the state and active is kept as it is, and one that the run's agent and
session hold on the resource with the same predicate (granted by a first
run of the step whose update never reached the state) is adopted.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar, Token
from typing import Annotated, Any, Literal, TypedDict

from langchain_core.runnables import RunnableConfig, RunnableLambda

from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError, LeaseLostError
from klockwork.core.leases.holding import HeldLeases
from klockwork.core.leases.rules import ParsedIntent, normalize_resource, parse_intents
from klockwork.core.model import Lease, LeaseState
from klockwork.core.validation import check_timeout
from klockwork.integrations.langchain.identity import Identity, resolve_identity

__all__ = [
    "LEASES_KEY",
    "LeasesState",
    "aensure_leases",
    "ensure_leases",
    "lease_node",
    "leases_released",
    "merge_leases",
    "release_node",
]

#: Where the lease nodes keep ``{resource: entry}``.
LEASES_KEY = "klockwork_leases"
_DEFAULT_TTL_MS = 30_000

OnLost = Literal["reacquire", "fail"]
IntentSpec = Any  # "TYPE:path" | (resource, predicate) | Intent | a list of these
Intents = IntentSpec | Callable[[Any], IntentSpec]


def merge_leases(left: Mapping[str, Any] | None, right: Mapping[str, Any] | None) -> dict[str, Any]:
    """The reducer of ``klockwork_leases``: merge per resource, ``None`` removes one."""
    out = {k: v for k, v in (left or {}).items() if v is not None}
    for key, value in (right or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


class LeasesState(TypedDict, total=False):
    """The state key the lease nodes write; subclass it for your graph's state."""

    klockwork_leases: Annotated[dict[str, dict[str, Any]], merge_leases]


# -- renewal and the run's scope -----------------------------------------------------------------
class _Tracker:
    """The leases lease nodes keep renewed in this process, for one engine."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[str, HeldLeases] = {}

    def keep(self, kw: Klockwork, lease: Lease, ttl_ms: int) -> None:
        with self.lock:
            if lease.lease_id in self.held:
                return
            self.held[lease.lease_id] = held = HeldLeases([lease])
        # The engine's one renewer (as ``kw.leases.hold(auto_renew=True)`` uses it).
        kw.leases.renewer.add(held, ttl_ms / 3000)

    def drop(self, kw: Klockwork, lease_id: str) -> None:
        with self.lock:
            held = self.held.pop(lease_id, None)
        if held is not None:
            kw.leases.renewer.remove(held)

    def lost(self, lease_id: str) -> bool:
        held = self.held.get(lease_id)
        return held is not None and held.lost


_trackers: weakref.WeakKeyDictionary[Klockwork, _Tracker] = weakref.WeakKeyDictionary()
_trackers_lock = threading.Lock()


def _tracker(kw: Klockwork) -> _Tracker:
    with _trackers_lock:
        tracker = _trackers.get(kw)
        if tracker is None:
            tracker = _trackers[kw] = _Tracker()
        return tracker


class _Scope:
    def __init__(self, kw: Klockwork) -> None:
        self.kw = kw
        self.lock = threading.Lock()
        self.ids: dict[str, None] = {}  # ordered set of lease ids


_SCOPE: ContextVar[_Scope | None] = ContextVar("klockwork_lease_scope", default=None)


def _scoped(kw: Klockwork, lease_id: str, keep: bool) -> None:
    scope = _SCOPE.get()
    if scope is not None and scope.kw is kw:
        with scope.lock:
            if keep:
                scope.ids[lease_id] = None
            else:
                scope.ids.pop(lease_id, None)


class leases_released:
    """``with leases_released(kw):`` releases, at the end of the block, every lease
    that lease nodes took or kept inside it and that is still held.

    Works across LangGraph's worker threads and tasks (it travels in a
    context variable, which LangGraph copies into every node it runs). Use
    ``async with`` around ``ainvoke`` / ``astream``.
    """

    def __init__(self, kw: Klockwork) -> None:
        self._scope = _Scope(_check_engine(kw))
        self._token: Token[_Scope | None] | None = None

    def __enter__(self) -> leases_released:
        self._token = _SCOPE.set(self._scope)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        failure: Exception | None = None
        for lease_id in self._end():
            try:
                self._scope.kw.leases.release(lease_id)
            except Exception as exc:  # try every lease; the TTL bounds one not released
                failure = failure or exc
        if failure is not None and exc_type is None:  # the block's own exception wins
            raise failure

    async def __aenter__(self) -> leases_released:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        failure: Exception | None = None
        for lease_id in self._end():
            try:
                await self._scope.kw.leases.arelease(lease_id)
            except Exception as exc:
                failure = failure or exc
        if failure is not None and exc_type is None:
            raise failure

    @property
    def lease_ids(self) -> list[str]:
        """The leases this block will release (taken or kept inside it, not yet released)."""
        with self._scope.lock:
            return list(self._scope.ids)

    def _end(self) -> list[str]:
        if self._token is not None:
            _SCOPE.reset(self._token)
            self._token = None
        scope = self._scope
        with scope.lock:
            ids, scope.ids = list(scope.ids), {}
        tracker = _tracker(scope.kw)
        for lease_id in ids:
            tracker.drop(scope.kw, lease_id)
        return ids


# -- planning ------------------------------------------------------------------------------------
def _entries(state: Any) -> dict[str, dict[str, Any]]:
    value = (
        state.get(LEASES_KEY) if isinstance(state, Mapping) else getattr(state, LEASES_KEY, None)
    )
    if not isinstance(value, Mapping):
        return {}
    return {k: dict(v) for k, v in value.items() if isinstance(v, Mapping)}


def _parse(spec: IntentSpec) -> tuple[ParsedIntent, ...]:
    if isinstance(spec, str):
        spec = (spec, "MUTATES")
    elif isinstance(spec, list | tuple) and not (
        isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, str) for x in spec)
    ):
        spec = [(s, "MUTATES") if isinstance(s, str) else s for s in spec]
    return parse_intents(spec)


def _entry(lease: Lease, ttl_ms: int, old: Mapping[str, Any] | None) -> dict[str, Any]:
    renewed = old is not None and old.get("lease_id") != lease.lease_id
    return {
        "lease_id": lease.lease_id,
        "resource": lease.resource,
        "predicate": lease.predicate.value,
        "fencing_token": lease.fencing_token,
        "acquired_at": lease.acquired_at,
        "expires_at": lease.expires_at,
        "ttl_ms": ttl_ms,
        "agent_id": lease.agent_id,
        "session_id": lease.session_id,
        "reacquired": (int(old.get("reacquired") or 0) + 1) if old and renewed else 0,
        "previous_token": old.get("fencing_token") if old and renewed else None,
    }


class _Plan:
    """What one lease node run does: lookups first (sync), then one acquire."""

    def __init__(
        self,
        kw: Klockwork,
        ident: Identity,
        entries: dict[str, dict[str, Any]],
        wanted: Iterable[ParsedIntent],
        ttl_ms: int,
        on_lost: OnLost,
    ) -> None:
        self.kw, self.ident, self.entries, self.ttl_ms = kw, ident, entries, ttl_ms
        self.kept: list[tuple[Lease, dict[str, Any]]] = []  # active: keep renewing
        self.update: dict[str, Any] = {}
        self.missing: list[ParsedIntent] = []
        self.superseded: list[str] = []  # in the state, no longer active or replaced
        tracker = _tracker(kw)
        for intent in wanted:
            entry = entries.get(intent.key)
            if entry is not None:
                lease = self._active(tracker, str(entry.get("lease_id")))
                if lease is not None and lease.predicate is intent.predicate:
                    self.kept.append((lease, entry))
                    continue
                if lease is None and on_lost == "fail":
                    raise LeaseLostError(
                        str(entry.get("lease_id")),
                        f"the lease on {intent.key} (fencing token "
                        f"{entry.get('fencing_token')}) is no longer held; "
                        "on_lost='fail' does not re-acquire it",
                    )
                self.superseded.append(str(entry.get("lease_id")))
            adopted = self._adoptable(intent)
            if adopted is not None:
                self.kept.append((adopted, entry or {}))
                self.update[intent.key] = _entry(adopted, ttl_ms, entry)
            else:
                self.missing.append(intent)

    def _active(self, tracker: _Tracker, lease_id: str) -> Lease | None:
        if tracker.lost(lease_id):
            return None
        lease = self.kw.leases.get(lease_id)
        return lease if lease is not None and lease.state is LeaseState.ACTIVE else None

    def _adoptable(self, intent: ParsedIntent) -> Lease | None:
        """A lease this run's agent and session already hold (a re-run's first grant)."""
        for lease in self.kw.leases.list(agent_id=self.ident.agent_id, resource=intent.key):
            if (
                lease.session_id == self.ident.session_id
                and lease.resource == intent.key
                and lease.predicate is intent.predicate
            ):
                return lease
        return None

    @property
    def request(self) -> list[tuple[str, str]]:
        return [(i.key, i.predicate.value) for i in self.missing]

    def finish(self, granted: Iterable[Lease]) -> tuple[dict[str, Any], list[str]]:
        """Keep every lease renewed and in the scope; the update, and leases to give back."""
        tracker = _tracker(self.kw)
        for lease in granted:
            old = self.entries.get(lease.resource)
            self.update[lease.resource] = entry = _entry(lease, self.ttl_ms, old)
            self.kept.append((lease, entry))
        for lease, entry in self.kept:
            tracker.keep(self.kw, lease, int(entry.get("ttl_ms") or self.ttl_ms))
            _scoped(self.kw, lease.lease_id, keep=True)
        give_back = []
        for lease_id in self.superseded:
            tracker.drop(self.kw, lease_id)
            _scoped(self.kw, lease_id, keep=False)
            give_back.append(lease_id)  # a replaced predicate; a no-op when already gone
        return self.update, give_back


def _wanted(intents: Intents | None, state: Any, entries: Mapping[str, Any]) -> list[ParsedIntent]:
    if intents is None:
        return [_parse((e["resource"], e["predicate"]))[0] for e in entries.values()]
    spec = intents(state) if callable(intents) else intents
    return list(_parse(spec))


def _ensure(
    kw: Klockwork,
    state: Any,
    config: RunnableConfig | None,
    intents: Intents | None,
    opts: _Options,
) -> dict[str, Any]:
    entries = _entries(state)
    ident = resolve_identity(config, agent_id=opts.agent_id)
    plan = _Plan(kw, ident, entries, _wanted(intents, state, entries), opts.ttl_ms, opts.on_lost)
    granted: list[Lease] = []
    if plan.missing:
        verdict = kw.leases.acquire(
            ident.agent_id, ident.session_id, plan.request, opts.ttl_ms, opts.timeout_s
        )
        granted = list(verdict.leases)
    update, give_back = plan.finish(granted)
    for lease_id in give_back:
        kw.leases.release(lease_id)
    return {LEASES_KEY: {**entries, **update}}


async def _aensure(
    kw: Klockwork,
    state: Any,
    config: RunnableConfig | None,
    intents: Intents | None,
    opts: _Options,
) -> dict[str, Any]:
    entries = _entries(state)
    ident = resolve_identity(config, agent_id=opts.agent_id)
    wanted = _wanted(intents, state, entries)
    plan = await asyncio.to_thread(_Plan, kw, ident, entries, wanted, opts.ttl_ms, opts.on_lost)
    granted: list[Lease] = []
    if plan.missing:
        verdict = await kw.leases.aacquire(
            ident.agent_id, ident.session_id, plan.request, opts.ttl_ms, opts.timeout_s
        )
        granted = list(verdict.leases)
    update, give_back = plan.finish(granted)
    for lease_id in give_back:
        await kw.leases.arelease(lease_id)
    return {LEASES_KEY: {**entries, **update}}


class _Options:
    def __init__(
        self, ttl_ms: int, timeout_s: float | None, on_lost: str, agent_id: str | None
    ) -> None:
        if type(ttl_ms) is not int or ttl_ms <= 0:
            raise InvalidRequestError("ttl_ms", ttl_ms, "expected a positive int (milliseconds)")
        check_timeout(timeout_s)
        if on_lost not in ("reacquire", "fail"):
            raise InvalidRequestError("on_lost", on_lost, "expected 'reacquire' or 'fail'")
        self.ttl_ms = ttl_ms
        self.timeout_s = timeout_s
        self.on_lost: OnLost = "fail" if on_lost == "fail" else "reacquire"
        self.agent_id = agent_id


def _check_engine(kw: object) -> Klockwork:
    if not isinstance(kw, Klockwork):
        raise InvalidRequestError("kw", kw, "expected a Klockwork engine")
    return kw


# -- the public functions ------------------------------------------------------------------------
def lease_node(
    kw: Klockwork,
    intents: Intents,
    *,
    ttl_ms: int = _DEFAULT_TTL_MS,
    timeout_s: float | None = None,
    on_lost: OnLost = "reacquire",
    agent_id: str | None = None,
) -> RunnableLambda[Any, dict[str, Any]]:
    """A node that leases ``intents`` for the run, until :func:`release_node`.

    Args:
        kw: the engine.
        intents: a resource (``"FILE:/repo/auth"``, MUTATES), a
            ``(resource, predicate)`` pair, an ``Intent``, a list of these (one
            manifest), or a callable taking the state and returning one.
        ttl_ms: each lease's lifetime; renewed every ttl/3 while held.
        timeout_s: how long to wait for the leases (None: as long as needed).
        on_lost: a lease in the state that is no longer held: ``"reacquire"``
            it (new fencing token) or ``"fail"`` with ``LeaseLostError``.
        agent_id: a fixed agent; by default the run's.

    Returns:
        The node; it writes ``{"klockwork_leases": {resource: entry}}`` for
        the leases it granted or adopted (see the module docstring).

    Raises:
        InvalidRequestError: a bad option (here) or bad intents (when it runs).
        LeaseTimeoutError: not granted within ``timeout_s`` (the node fails).
        LeaseLostError: ``on_lost="fail"`` and a lease was lost.
    """
    engine = _check_engine(kw)
    opts = _Options(ttl_ms, timeout_s, on_lost, agent_id)
    if not callable(intents):
        _parse(intents)  # bad static intents fail when the graph is built

    def lease(state: Any, config: RunnableConfig) -> dict[str, Any]:
        return _ensure(engine, state, config, intents, opts)

    async def alease(state: Any, config: RunnableConfig) -> dict[str, Any]:
        return await _aensure(engine, state, config, intents, opts)

    return RunnableLambda(lease, afunc=alease, name="lease")


def ensure_leases(
    kw: Klockwork,
    state: Any,
    config: RunnableConfig | None = None,
    *,
    on_lost: OnLost = "reacquire",
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Check the state's leases from inside a node: renew what is held, re-acquire what is not.

    Call it first in a node that may run after a pause (an interrupt, a
    resume in another process) and merge the result into the node's update.

    Returns:
        ``{"klockwork_leases": {resource: entry}}``: the state's leases, those
        that were re-acquired with their new entries (fencing tokens included).

    Raises:
        LeaseTimeoutError: a lost lease was not re-acquired within ``timeout_s``.
        LeaseLostError: ``on_lost="fail"`` and a lease was lost.
    """
    opts = _Options(_DEFAULT_TTL_MS, timeout_s, on_lost, None)
    return _ensure(_check_engine(kw), state, config, None, _ttl_of(state, opts))


async def aensure_leases(
    kw: Klockwork,
    state: Any,
    config: RunnableConfig | None = None,
    *,
    on_lost: OnLost = "reacquire",
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Async twin of :func:`ensure_leases`."""
    opts = _Options(_DEFAULT_TTL_MS, timeout_s, on_lost, None)
    return await _aensure(_check_engine(kw), state, config, None, _ttl_of(state, opts))


def _ttl_of(state: Any, opts: _Options) -> _Options:
    """Re-acquire with the lifetime the leases were first granted with."""
    ttls = [e.get("ttl_ms") for e in _entries(state).values()]
    ttl = max((t for t in ttls if type(t) is int and t > 0), default=opts.ttl_ms)
    return _Options(ttl, opts.timeout_s, opts.on_lost, opts.agent_id)


def release_node(
    kw: Klockwork, resources: str | Iterable[str] | None = None
) -> RunnableLambda[Any, dict[str, Any]]:
    """A node that releases the state's leases (all, or those on ``resources``).

    Releasing a lease that is no longer held (expired, revoked, already
    released) is not an error. Renewal stops at once.

    Returns:
        The node; it writes ``{"klockwork_leases": {resource: None, ...}}``,
        which the reducer turns into removals.
    """
    engine = _check_engine(kw)
    only: set[str] | None = None
    if resources is not None:
        names = [resources] if isinstance(resources, str) else list(resources)
        only = {normalize_resource(r) for r in names}

    def chosen(state: Any) -> dict[str, str]:
        return {
            key: str(entry.get("lease_id"))
            for key, entry in _entries(state).items()
            if only is None or key in only
        }

    def stop(ids: Iterable[str]) -> None:
        tracker = _tracker(engine)
        for lease_id in ids:
            tracker.drop(engine, lease_id)
            _scoped(engine, lease_id, keep=False)

    def release(state: Any, config: RunnableConfig) -> dict[str, Any]:
        leases = chosen(state)
        stop(leases.values())
        for lease_id in leases.values():
            engine.leases.release(lease_id)
        return {LEASES_KEY: dict.fromkeys(leases)}

    async def arelease(state: Any, config: RunnableConfig) -> dict[str, Any]:
        leases = chosen(state)
        stop(leases.values())
        for lease_id in leases.values():
            await engine.leases.arelease(lease_id)
        return {LEASES_KEY: dict.fromkeys(leases)}

    return RunnableLambda(release, afunc=arelease, name="release")
