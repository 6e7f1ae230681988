"""Agents talk over ``kw.bus``: :func:`bus_tools` gives a model three tools.

* ``send_message(channel, message)`` publishes ``message`` (a JSON object,
  or text, sent as ``{"text": ...}``) with the sender's identity in
  ``"from"`` — set by the tool from the run config, never by the model;
* ``read_messages(channel, max_messages=10)`` takes what is waiting for the
  agent on ``channel`` through a consumer group and acks it (read is
  consumed), returning compact JSON: each message's ``seq``, ``id``,
  ``from``, delivery ``attempt`` and body;
* ``wait_for_messages(channels, mode="any", n=1, timeout_s=None)`` blocks
  until messages are there (``any`` channel, one on ``all``, ``at_least``
  ``n`` in all), then returns and acks them like ``read_messages``.

Who reads what: by default each agent reads through a group of its own
(named after its identity), so every agent sees every message of a channel,
from the oldest the channel retains (groups are created with
``start="earliest"``: a message sent before the reader's first read is not
missed). Give ``group="workers"`` to make agents share the work instead:
each message then goes to one of them. The consumer is the agent's
identity, resolved from the run config like every other wrapper (see
:mod:`.identity`).

A mistake the model makes — a channel the tools do not allow, a badly
formed argument, a payload that is not JSON — ends as an error
``ToolMessage`` the model can read, never as an exception that ends the
run. A store that cannot answer still raises (it fails closed).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, Field, ValidationError, field_validator

from klockwork.core.bus.model import Delivery, Message, check_channel, check_group_name
from klockwork.core.engine import Klockwork
from klockwork.core.errors import InvalidRequestError
from klockwork.core.validation import check_timeout
from klockwork.integrations.langchain.errors import ToolArgumentError
from klockwork.integrations.langchain.identity import resolve_identity

__all__ = ["DEFAULT_WAIT_S", "bus_tools"]

#: The longest ``wait_for_messages`` waits by default (and at most).
DEFAULT_WAIT_S = 30.0
#: The most messages one ``read_messages`` call returns.
MAX_READ = 100

_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")
_GLOB = re.compile(r"[*?\[]")


# -- what the model fills in ----------------------------------------------------------
class SendMessageInput(BaseModel):
    channel: str = Field(description="The channel to publish on.")
    message: dict[str, Any] | str = Field(
        description='The message: a JSON object, or text (sent as {"text": ...}).'
    )


class ReadMessagesInput(BaseModel):
    channel: str = Field(description="The channel to read.")
    max_messages: int = Field(10, ge=1, le=MAX_READ, description="The most messages to return.")


class WaitForMessagesInput(BaseModel):
    channels: list[str] = Field(description="The channels to wait on.")
    mode: Literal["any", "all", "at_least"] = Field(
        "any",
        description="'any': a message on any channel; 'all': one on every channel; "
        "'at_least': n messages in all.",
    )
    n: int = Field(1, ge=1, le=100, description="With mode 'at_least': how many messages.")
    timeout_s: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="How long to wait, in seconds (default and most: the tool's limit).",
    )

    @field_validator("channels", mode="before")
    @classmethod
    def _one_channel(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value  # a lone name is forgiven


# -- the tools' shared settings ----------------------------------------------------------
class _BusTools:
    """One :func:`bus_tools` call's settings; each tool function asks it."""

    def __init__(
        self,
        kw: Klockwork | None,
        channels: Sequence[str] | None,
        group: str | None,
        consumer: str | None,
        agent_id: str | None,
        wait_s: float,
        start: str,
    ) -> None:
        self._kw = kw
        self.patterns = None if channels is None else _patterns(channels)
        self.group = None if group is None else check_group_name(group, "group")
        self.consumer = None if consumer is None else check_group_name(consumer, "consumer")
        self.agent_id = agent_id
        self.wait_s = wait_s
        self.start = start
        self._ready: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @property
    def kw(self) -> Klockwork:
        return self._kw if self._kw is not None else Klockwork.default()

    def agent(self, config: RunnableConfig | None) -> str:
        return resolve_identity(config, agent_id=self.agent_id).agent_id

    def reader(self, config: RunnableConfig | None) -> tuple[str, str]:
        """(group, consumer) the calling agent reads through."""
        agent = _bus_name(self.agent(config))
        return self.group or agent, self.consumer or agent

    def channel(self, tool: str, argument: str, value: object) -> str:
        """``value`` if it is a channel these tools accept; else an error for the model."""
        try:
            name = check_channel(value, argument)
        except InvalidRequestError as exc:
            raise _for_model(tool, exc) from None
        if self.patterns is not None and not any(
            fnmatch.fnmatchcase(name, p) for p in self.patterns
        ):
            allowed = ", ".join(self.patterns)
            raise ToolArgumentError(
                tool, argument, value, f"is not a channel you may use ({allowed})"
            )
        return name

    def needs_group(self, channel: str, group: str) -> bool:
        with self._lock:
            return (channel, group) not in self._ready

    def group_ready(self, channel: str, group: str) -> None:
        with self._lock:
            self._ready.add((channel, group))

    def timeout(self, timeout_s: float | None) -> float:
        return self.wait_s if timeout_s is None else min(max(timeout_s, 0.0), self.wait_s)

    def describe(self, text: str) -> str:
        if self.patterns is None:
            return text
        return f"{text} Channels you may use: {', '.join(self.patterns)}."


def _patterns(channels: object) -> list[str]:
    if isinstance(channels, str) or not isinstance(channels, Sequence) or not channels:
        raise InvalidRequestError("channels", channels, "expected a list of channel names or globs")
    out: list[str] = []
    for item in channels:
        if not isinstance(item, str) or not item:
            raise InvalidRequestError("channels", item, "expected a channel name or a glob")
        out.append(item if _GLOB.search(item) else check_channel(item, "channels"))
    return out


def _bus_name(identity: str) -> str:
    """An identity as a group/consumer name (their alphabet is narrower than identities')."""
    if _NAME.fullmatch(identity):
        return identity
    safe = re.sub(r"[^A-Za-z0-9_.:\-]", "_", identity)[:180]
    return f"{safe}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _for_model(tool: str, exc: InvalidRequestError) -> ToolArgumentError:
    return ToolArgumentError(tool, exc.argument, exc.value, exc.problem)


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _entry(message: Message, attempt: int | None = None) -> dict[str, Any]:
    """One message as the model reads it: who sent it, where it sits, what it says."""
    body = dict(message.payload)
    sender = body.pop("from", None)
    out: dict[str, Any] = {"seq": message.seq, "id": message.id, "from": sender}
    if attempt is not None:
        out["attempt"] = attempt
    out["message"] = body
    return out


def _read_result(channel: str, deliveries: list[Delivery]) -> str:
    messages = [_entry(d.message, d.attempt) for d in deliveries]
    return _json({"channel": channel, "count": len(messages), "messages": messages})


def _payload(message: dict[str, Any] | str, sender: str) -> dict[str, Any]:
    body = {"text": message} if isinstance(message, str) else dict(message)
    body["from"] = sender  # the sender is who the run config says, not what the model wrote
    return body


# -- the tools -----------------------------------------------------------------------------
def _send_tool(s: _BusTools) -> BaseTool:
    name = "send_message"

    def prepare(channel: str, message: dict[str, Any] | str, config: RunnableConfig) -> Any:
        return s.channel(name, "channel", channel), _payload(message, s.agent(config))

    def sent(msg: Message) -> str:
        return _json({"sent": True, "channel": msg.channel, "seq": msg.seq, "id": msg.id})

    def send(channel: str, message: dict[str, Any] | str, config: RunnableConfig) -> str:
        ch, payload = prepare(channel, message, config)
        try:
            return sent(s.kw.bus.publish(ch, payload))
        except InvalidRequestError as exc:
            raise _for_model(name, exc) from None

    async def asend(channel: str, message: dict[str, Any] | str, config: RunnableConfig) -> str:
        ch, payload = prepare(channel, message, config)
        try:
            return sent(await s.kw.bus.apublish(ch, payload))
        except InvalidRequestError as exc:
            raise _for_model(name, exc) from None

    about = "Send a message to the other agents on a channel. Returns its seq and id."
    return _make(name, s.describe(about), SendMessageInput, send, asend)


def _read_tool(s: _BusTools) -> BaseTool:
    name = "read_messages"

    def read(channel: str, config: RunnableConfig, max_messages: int = 10) -> str:
        ch = s.channel(name, "channel", channel)
        group, consumer = s.reader(config)
        bus = s.kw.bus
        if s.needs_group(ch, group):
            bus.create_group(ch, group, start=s.start)
            s.group_ready(ch, group)
        got = bus.subscribe(ch, group, consumer, max_messages)
        if got:
            bus.ack(ch, group, got)
        return _read_result(ch, got)

    async def aread(channel: str, config: RunnableConfig, max_messages: int = 10) -> str:
        ch = s.channel(name, "channel", channel)
        group, consumer = s.reader(config)
        bus = s.kw.bus
        if s.needs_group(ch, group):
            await bus.acreate_group(ch, group, start=s.start)
            s.group_ready(ch, group)
        got = await bus.asubscribe(ch, group, consumer, max_messages)
        if got:
            await bus.aack(ch, group, got)
        return _read_result(ch, got)

    about = (
        "Read the messages waiting for you on a channel (each is returned once; "
        "returns at once, with none if nothing is waiting). Each has its sender "
        "('from'), its seq and its delivery attempt."
    )
    return _make(name, s.describe(about), ReadMessagesInput, read, aread)


def _wait_tool(s: _BusTools) -> BaseTool:
    name = "wait_for_messages"

    def prepare(channels: list[str], config: RunnableConfig) -> tuple[list[str], str, str]:
        if not channels:
            raise ToolArgumentError(name, "channels", channels, "names no channel")
        names = [s.channel(name, "channels", c) for c in channels]
        if len(set(names)) != len(names):
            raise ToolArgumentError(name, "channels", channels, "names a channel twice")
        return (names, *s.reader(config))

    def result(res: Any) -> str:
        messages = {c: [_entry(m) for m in ms] for c, ms in res.messages.items()}
        return _json({"satisfied": res.satisfied, "timed_out": res.timed_out, "messages": messages})

    def wait(
        channels: list[str],
        config: RunnableConfig,
        mode: Literal["any", "all", "at_least"] = "any",
        n: int = 1,
        timeout_s: float | None = None,
    ) -> str:
        names, group, consumer = prepare(channels, config)
        bus = s.kw.bus
        for ch in names:
            if s.needs_group(ch, group):
                bus.create_group(ch, group, start=s.start)
                s.group_ready(ch, group)
        try:
            res = bus.await_channels(names, mode, n, group, s.timeout(timeout_s), consumer=consumer)
        except InvalidRequestError as exc:
            raise _for_model(name, exc) from None
        return result(res)

    async def await_(
        channels: list[str],
        config: RunnableConfig,
        mode: Literal["any", "all", "at_least"] = "any",
        n: int = 1,
        timeout_s: float | None = None,
    ) -> str:
        names, group, consumer = prepare(channels, config)
        bus = s.kw.bus
        for ch in names:
            if s.needs_group(ch, group):
                await bus.acreate_group(ch, group, start=s.start)
                s.group_ready(ch, group)
        try:
            res = await bus.aawait_channels(
                names, mode, n, group, s.timeout(timeout_s), consumer=consumer
            )
        except InvalidRequestError as exc:
            raise _for_model(name, exc) from None
        return result(res)

    about = (
        "Wait until messages arrive on channels: mode 'any' (a message on any of "
        "them), 'all' (one on every channel) or 'at_least' (n in all). Returns them "
        "(each once), or timed_out=true if the wait ran out first."
    )
    return _make(name, s.describe(about), WaitForMessagesInput, wait, await_)


def _make(
    name: str,
    description: str,
    schema: type[BaseModel],
    func: Callable[..., str],
    coroutine: Callable[..., Any],
) -> BaseTool:
    return StructuredTool.from_function(
        func=func,
        coroutine=coroutine,
        name=name,
        description=description,
        args_schema=schema,
        handle_tool_error=_tool_error,  # the model reads why, and may try again
        handle_validation_error=_validation_message(name),
    )


def _tool_error(error: ToolException) -> str:
    return str(error)  # ToolArgumentError's str is written for the model


def _validation_message(name: str) -> Callable[[ValidationError], str]:
    def message(error: ValidationError) -> str:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}"
            for e in error.errors()[:5]
        )
        return f"Invalid arguments for tool {name!r}: {problems}. The tool did not run."

    return message


def bus_tools(
    kw: Klockwork | None = None,
    *,
    channels: Sequence[str] | None = None,
    group: str | None = None,
    consumer: str | None = None,
    agent_id: str | None = None,
    wait_s: float = DEFAULT_WAIT_S,
    start: Literal["earliest", "new"] = "earliest",
) -> list[BaseTool]:
    """Tools that let a model talk to other agents over ``kw.bus``.

    Returns ``[send_message, read_messages, wait_for_messages]`` (see the
    module docstring), sync and async.

    Args:
        kw: the engine; ``Klockwork.default()`` when None.
        channels: the channels the tools accept (names, or globs such as
            ``"team.*"``); a model naming another one gets an error
            ``ToolMessage``. None: any channel.
        group: the consumer group every agent reads through (the agents
            share the work: each message goes to one of them). None: a
            group per agent, named after its identity (each agent sees
            every message).
        consumer: a fixed consumer name; by default the agent's identity.
        agent_id: a fixed sender and reader; by default read from the
            call's config.
        wait_s: the longest ``wait_for_messages`` waits (also its default
            ``timeout_s``; a longer one asked for by the model is cut to it).
        start: where a group the tools create starts: ``"earliest"`` (every
            message the channel retains) or ``"new"`` (messages published
            from then on). An existing group is used as it is.

    Raises:
        InvalidRequestError: an invalid option (no tools were made).
    """
    timeout = check_timeout(wait_s, "wait_s")
    if timeout is None:
        raise InvalidRequestError("wait_s", wait_s, "expected seconds >= 0")
    if start not in ("earliest", "new"):
        raise InvalidRequestError("start", start, "expected 'earliest' or 'new'")
    if agent_id is not None:
        resolve_identity(agent_id=agent_id)  # checks it
    settings = _BusTools(kw, channels, group, consumer, agent_id, timeout, start)
    return [_send_tool(settings), _read_tool(settings), _wait_tool(settings)]
