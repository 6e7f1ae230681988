"""Bus nodes for LangGraph: :func:`publish_node` and :func:`await_node`.

Both return a runnable with a sync and an async side (``invoke`` uses
``kw.bus.publish`` / ``kw.bus.await_channels``, ``ainvoke`` their async
twins, so an async graph never blocks its event loop). Add them with
``builder.add_node(name, node)``; outside a graph call
``node.invoke(state, config)``.

The state keys they write (:data:`BUS_STATE_KEYS`; declare them in your
state, or subclass :class:`BusState`):

* ``klockwork_published`` (:data:`PUBLISHED_KEY`) — written by
  :func:`publish_node`: ``{channel: {"id": ..., "seq": ...}}``, merged over
  what the state already holds, so several publish nodes add up;
* ``klockwork_messages`` (:data:`MESSAGES_KEY`) — written by
  :func:`await_node`: ``{channel: [message, ...]}`` for every awaited
  channel, each message a dict ``{"id", "channel", "seq", "payload",
  "published_at", "visible_at"}``;
* ``timed_out`` (:data:`TIMED_OUT_KEY`) — written by :func:`await_node`:
  True when the wait ran out before ``mode`` was satisfied. Nothing was
  consumed then: with a group, the messages listed were handed back and
  will be delivered again.

Routing on a timeout is a conditional edge on that key::

    builder.add_node("wait", await_node(kw, ["review.replies"], group="bot", wait_s=30))
    builder.add_conditional_edges(
        "wait", lambda s: "escalate" if s["timed_out"] else "merge", ["escalate", "merge"]
    )

Re-runs are safe. LangGraph runs a node again when a run is resumed
(after an ``interrupt()`` in the same node, or after a failure of the step).
Its config then names the same *step*: the same ``thread_id`` and
``checkpoint_ns`` (which carries the task id, fixed for the step). From
that step identity the nodes derive:

* the publish ``key`` (unless one is given): the re-run returns the
  message published the first time and publishes nothing;
* with a group, the await ``key`` and (unless one is given) the
  ``consumer``: a re-run returns the messages the first run consumed and
  consumes nothing more.

A run without a ``thread_id`` (no checkpointer, so nothing to resume)
publishes and awaits without a key. Two publishes on one channel from
the same step (one node calling two publish nodes) share a derived key:
give them explicit keys. Forking a thread from an older checkpoint runs
new steps, which publish and consume anew.

Without a group an await consumes nothing and waits for messages
published *after* it starts; to see messages published before the node
runs, await through a group created beforehand
(``kw.bus.create_group(channel, group)``, or ``start="earliest"``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypedDict

from langchain_core.runnables import RunnableConfig, RunnableLambda

from klockwork.core.bus.model import (
    AWAIT_MODES,
    AwaitMode,
    AwaitResult,
    Message,
    channel_list,
    check_channel,
    check_dedup_key,
    check_group_name,
    encode_payload,
)
from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError
from klockwork.core.validation import check_int, check_timeout

__all__ = [
    "BUS_STATE_KEYS",
    "MESSAGES_KEY",
    "PUBLISHED_KEY",
    "TIMED_OUT_KEY",
    "BusState",
    "await_node",
    "message_dict",
    "publish_node",
    "step_identity",
]

#: Where :func:`publish_node` writes ``{channel: {"id", "seq"}}``.
PUBLISHED_KEY = "klockwork_published"
#: Where :func:`await_node` writes ``{channel: [message dicts]}``.
MESSAGES_KEY = "klockwork_messages"
#: Where :func:`await_node` writes whether its wait ran out (a bool).
TIMED_OUT_KEY = "timed_out"
#: Every state key the bus nodes write.
BUS_STATE_KEYS: tuple[str, ...] = (PUBLISHED_KEY, MESSAGES_KEY, TIMED_OUT_KEY)

_PER_CHANNEL = 100  # the most one await takes from one channel (klockwork.core.bus.awaiting)
_TASK_ID_KEY = "__pregel_task_id"  # langgraph's configurable key naming the running task

Payload = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None


def _merge(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    return {**(left or {}), **(right or {})}


class BusState(TypedDict, total=False):
    """The state keys the bus nodes write; subclass it for your graph's state.

    ``klockwork_published`` merges the updates of publish nodes that run in
    the same step (a reducer), the other two keys hold the last await's result.
    """

    klockwork_published: Annotated[dict[str, dict[str, Any]], _merge]
    klockwork_messages: dict[str, list[dict[str, Any]]]
    timed_out: bool


def step_identity(config: RunnableConfig | None) -> str | None:
    """Who this run of a node is: the same on every re-run of its step, else None.

    Built from ``configurable`` ``thread_id``, ``checkpoint_ns`` (``node:<task id>``,
    nested for subgraphs) and the task id; None without a thread (nothing
    resumes such a run) or outside a LangGraph task.
    """
    conf: Mapping[str, Any] = (config or {}).get("configurable") or {}
    thread = conf.get("thread_id")
    ns = conf.get("checkpoint_ns") or ""
    task = conf.get(_TASK_ID_KEY) or ""
    if thread is None or not (ns or task):
        return None
    return f"langgraph:{thread}:{ns}:{task}"


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:40]


def _state_value(state: Any, key: str) -> Any:
    if isinstance(state, Mapping):
        return state.get(key)
    return getattr(state, key, None)


def message_dict(message: Message) -> dict[str, Any]:
    """A message as the JSON-ready dict the await node writes to the state."""
    return message.to_dict()


def _check_engine(kw: object) -> Klockwork:
    if not isinstance(kw, Klockwork):
        raise InvalidRequestError("kw", kw, "expected a Klockwork engine")
    return kw


def _node_name(prefix: str, channels: Sequence[str]) -> str:
    return prefix + "_" + "_".join(c.replace(".", "_").replace(":", "_") for c in channels)


# -- publish ----------------------------------------------------------------------------------
def publish_node(
    kw: Klockwork,
    channel: str,
    payload: Payload = None,
    *,
    key: str | None = None,
) -> RunnableLambda[Any, dict[str, Any]]:
    """A node that publishes ``payload`` on ``channel``, once per step.

    Args:
        kw: the engine.
        channel: where to publish (``[A-Za-z0-9_.:-]``, 1-200 characters).
        payload: a JSON object, or a callable taking the state and
            returning one; None publishes ``{}``.
        key: the idempotency key; by default derived from the step (see
            the module docstring), so a re-run of the step publishes nothing.

    Returns:
        The node; it writes ``{"klockwork_published": {channel: {"id", "seq"}}}``
        (merged over the state's).

    Raises:
        InvalidRequestError: a bad option (here), or a payload callable
            returning something that is not a JSON object (when the node runs).
    """
    engine = _check_engine(kw)
    check_channel(channel)
    if payload is not None and not callable(payload):
        if not isinstance(payload, Mapping):
            raise InvalidRequestError("payload", payload, "expected a dict, a callable or None")
        encode_payload(dict(payload))  # a bad payload fails when the graph is built
    fixed_key = None if key is None else check_dedup_key(key)

    def args(state: Any, config: RunnableConfig) -> tuple[dict[str, Any], str | None]:
        body = payload(state) if callable(payload) else payload
        data = {} if body is None else (dict(body) if isinstance(body, Mapping) else body)
        step = step_identity(config)
        derived = None if step is None else f"lg-publish:{_digest(step, channel)}"
        return data, fixed_key or derived

    def update(state: Any, message: Message) -> dict[str, Any]:
        published = dict(_state_value(state, PUBLISHED_KEY) or {})
        published[channel] = {"id": message.id, "seq": message.seq}
        return {PUBLISHED_KEY: published}

    def publish(state: Any, config: RunnableConfig) -> dict[str, Any]:
        data, dedup = args(state, config)
        return update(state, engine.bus.publish(channel, data, key=dedup))

    async def apublish(state: Any, config: RunnableConfig) -> dict[str, Any]:
        data, dedup = args(state, config)
        return update(state, await engine.bus.apublish(channel, data, key=dedup))

    name = _node_name("publish", [channel])
    return RunnableLambda(publish, afunc=apublish, name=name)


# -- await ------------------------------------------------------------------------------------
def await_node(
    kw: Klockwork,
    channels: str | Sequence[str],
    *,
    mode: AwaitMode = "any",
    n: int = 1,
    group: str | None = None,
    wait_s: float = 0,
    consumer: str | None = None,
) -> RunnableLambda[Any, dict[str, Any]]:
    """A node that waits for messages on ``channels`` (``kw.bus.await_channels``).

    Args:
        kw: the engine.
        channels: a channel name or a list of them.
        mode: ``"any"`` (a message on any channel), ``"all"`` (one on
            every channel) or ``"at_least"`` (``n`` in all).
        n: for ``"at_least"``.
        group: consume through this consumer group (what the node returns
            is acked for the group); None consumes nothing and waits for
            messages published after the node starts.
        wait_s: how long to wait; 0 looks once.
        consumer: the group consumer; by default one per step (see the
            module docstring), or ``"await"`` outside a resumable run.

    Returns:
        The node; it writes ``{"klockwork_messages": {channel: [message
        dicts]}, "timed_out": bool}``.

    Raises:
        InvalidRequestError: a bad option.
    """
    engine = _check_engine(kw)
    names = channel_list([channels] if isinstance(channels, str) else channels)
    if not isinstance(mode, str) or mode not in AWAIT_MODES:
        raise InvalidRequestError("mode", mode, "expected 'any', 'all' or 'at_least'")
    check_int(n, "n", low=1, high=_PER_CHANNEL * len(names))
    group_name = None if group is None else check_group_name(group, "group")
    check_timeout(wait_s, "wait_s", allow_none=False)
    fixed_consumer = None if consumer is None else check_group_name(consumer, "consumer")
    if fixed_consumer is not None and group_name is None:
        raise InvalidRequestError("consumer", consumer, "a consumer needs a group")

    def options(config: RunnableConfig) -> dict[str, Any]:
        opts: dict[str, Any] = {"mode": mode, "n": n, "group": group_name, "wait_s": wait_s}
        if group_name is None:
            return opts
        step = step_identity(config)
        if step is not None:
            opts["key"] = f"lg-await:{_digest(step, group_name, mode, n, *names)}"
        chosen = fixed_consumer or (None if step is None else f"lg-step-{_digest(step)[:32]}")
        if chosen is not None:
            opts["consumer"] = chosen
        return opts

    def update(result: AwaitResult) -> dict[str, Any]:
        messages = {c: [message_dict(m) for m in result.messages.get(c, [])] for c in names}
        return {MESSAGES_KEY: messages, TIMED_OUT_KEY: result.timed_out}

    def wait(state: Any, config: RunnableConfig) -> dict[str, Any]:
        return update(engine.bus.await_channels(names, **options(config)))

    async def await_(state: Any, config: RunnableConfig) -> dict[str, Any]:
        return update(await engine.bus.aawait_channels(names, **options(config)))

    return RunnableLambda(wait, afunc=await_, name=_node_name("await", names))
