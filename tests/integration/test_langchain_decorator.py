"""@klock_protected on functions below @tool, on BaseTool._run/_arun, sync and async."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from langchain_core.callbacks import CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException, tool
from lc_helpers import OLD, YOUNG, Probe, release_later

from klockwork import (
    InvalidRequestError,
    KlockClient,
    Klockwork,
    LeaseConflictError,
    VerdictStatus,
)
from klockwork.integrations.langchain import (
    RETRY_BUDGET_S,
    KlockConflictError,
    agent_config,
    klock_protected,
)


def parent_session(session_id: str) -> str:
    """The session a protected call ran inside: its lease is in a per-call
    sub-session ``<session>/call-<n>`` (an anonymous call's fresh session has
    no parent and is returned as is)."""
    parent, sep, _ = session_id.rpartition("/call-")
    return parent if sep else session_id


def make_writer(kw: Klockwork, probe: Probe | None = None, **options: Any) -> BaseTool:
    options.setdefault("timeout_s", 2.0)

    @tool
    @klock_protected("FILE:{path}", kw=kw, **options)
    def write_file(path: str, text: str = "") -> str:
        """Write text to a file."""
        if probe is not None:
            probe.enter()
            time.sleep(0.05)
            probe.leave()
        holders = [
            (lease.agent_id, parent_session(lease.session_id))
            for lease in kw.leases.list(resource=f"FILE:{path}")
        ]
        return f"wrote {path} as {holders}"

    return write_file


def test_below_tool_keeps_name_description_and_schema(kw: Klockwork) -> None:
    @tool
    def write_file(path: str, text: str = "") -> str:
        """Write text to a file."""
        return "unprotected"

    protected = make_writer(kw)
    assert protected.name == write_file.name
    assert protected.description == write_file.description
    assert protected.args == write_file.args
    assert (
        protected.tool_call_schema.model_json_schema()
        == write_file.tool_call_schema.model_json_schema()
    )


def test_lease_is_held_while_the_tool_runs_and_released_after(kw: Klockwork) -> None:
    out = make_writer(kw).invoke({"path": "/a"}, config=agent_config("writer", "s1"))
    assert out == "wrote /a as [('writer', 's1')]"
    assert kw.leases.list() == []


def test_wait_then_success_when_the_younger_holder_releases(kw: Klockwork) -> None:
    probe = Probe()
    held = kw.leases.acquire(YOUNG, "y", ("FILE:/a", "MUTATES"), 5_000)
    released = release_later(kw, [held.lease.lease_id], 0.2)
    out = make_writer(kw, probe).invoke({"path": "/a"}, config=agent_config(OLD, "o"))
    assert out == "wrote /a as [('old', 'o')]"
    assert probe.starts[0] >= released[0]  # the body ran only after the release


def test_die_is_retried_until_the_older_holder_releases(kw: Klockwork) -> None:
    probe = Probe()
    held = kw.leases.acquire(OLD, "o", ("FILE:/a", "MUTATES"), 5_000)
    released = release_later(kw, [held.lease.lease_id], 0.2)
    out = make_writer(kw, probe).invoke({"path": "/a"}, config=agent_config(YOUNG, "y"))
    assert out == "wrote /a as [('young', 'y')]"
    assert probe.starts[0] >= released[0]


def test_lease_is_released_when_the_tool_raises(kw: Klockwork) -> None:
    @klock_protected("FILE:{path}", kw=kw)
    def boom(path: str) -> None:
        assert [lease.resource for lease in kw.leases.list()] == ["FILE:/a"]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        boom("/a")
    assert kw.leases.list() == []
    assert kw.leases.try_acquire(YOUNG, "y", ("FILE:/a", "MUTATES")).granted


def test_extractor_failures_are_value_errors_and_lease_nothing(kw: Klockwork) -> None:
    @klock_protected("FILE:{path}", kw=kw)
    def write(path: str | None = None) -> str:
        return "ran"

    with pytest.raises(ValueError, match="'path' is empty"):
        write(None)
    with pytest.raises(ValueError, match="'path' is empty"):
        write("")

    def typo(path: str) -> str:
        return "ran"

    # A template naming a parameter the function lacks is the code's mistake,
    # found when decorating (not a model's bad argument found per call).
    with pytest.raises(InvalidRequestError, match="names arguments 'typo' does not take"):
        klock_protected("FILE:{missing}", kw=kw)(typo)

    @klock_protected(lambda args: args["nope"], kw=kw)
    def raising(path: str) -> str:
        return "ran"

    with pytest.raises(ValueError, match="raised KeyError"):
        raising("/a")

    @klock_protected(lambda args: [], kw=kw)
    def empty(path: str) -> str:
        return "ran"

    with pytest.raises(ValueError, match="expected a non-empty path"):
        empty("/a")
    assert kw.leases.list() == []


def test_manifest_leases_every_path_atomically(kw: Klockwork) -> None:
    @klock_protected(["FILE:{src}", lambda a: [f"FILE:{a['dst']}", "TABLE:moves"]], kw=kw)
    def move(src: str, dst: str) -> list[str]:
        return sorted(lease.resource for lease in kw.leases.list())

    assert move("/a", dst="/b") == ["FILE:/a", "FILE:/b", "TABLE:moves"]
    # All or none: one busy path blocks the whole call, and nothing stays held.
    kw.leases.acquire(OLD, "o", ("TABLE:moves", "MUTATES"), 5_000)
    busy = klock_protected(["FILE:{src}", "TABLE:moves"], kw=kw, timeout_s=0.05)(move)
    with pytest.raises(KlockConflictError) as info:
        busy("/a", dst="/b")
    assert info.value.resources == ["FILE:/a", "TABLE:moves"]
    assert [lease.resource for lease in kw.leases.list()] == ["TABLE:moves"]


def test_lease_auto_renews_past_its_ttl_while_the_tool_runs(kw: Klockwork) -> None:
    started = threading.Event()

    @klock_protected("FILE:{path}", kw=kw, ttl_ms=150, agent_id=OLD, session_id="o")
    def slow(path: str) -> str:
        started.set()
        time.sleep(0.5)
        return "done"

    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(slow("/a")))
    worker.start()
    assert started.wait(2)
    verdicts = []
    for _ in range(4):  # probes at ~0.1, 0.2, 0.3, 0.4 s: well past the 150 ms TTL
        time.sleep(0.1)
        verdicts.append(kw.leases.try_acquire(YOUNG, "y", ("FILE:/a", "MUTATES"), 1_000))
    worker.join()
    assert result == ["done"]
    assert [v.status for v in verdicts] == [VerdictStatus.DIE] * 4
    assert kw.leases.try_acquire(YOUNG, "y", ("FILE:/a", "MUTATES")).granted


def test_two_anonymous_concurrent_calls_exclude_each_other(kw: Klockwork) -> None:
    probe = Probe()
    writer = make_writer(kw, probe)
    barrier = threading.Barrier(2)
    outputs: list[str] = []

    def call() -> None:
        barrier.wait()
        outputs.append(writer.invoke({"path": "/a"}))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) == 2
    assert probe.max_inside == 1
    sessions = {out.split("'")[3] for out in outputs}
    assert len(sessions) == 2  # each anonymous call ran in a session of its own


def test_raise_mode_gives_klock_attributes(kw: Klockwork) -> None:
    kw.leases.acquire(YOUNG, "y", ("FILE:/a", "MUTATES"), 5_000)

    @klock_protected("FILE:{path}", kw=kw, agent_id=OLD, timeout_s=0.05, on_conflict="raise")
    def write(path: str) -> str:
        return "ran"

    with pytest.raises(KlockConflictError) as info:
        write("/a")
    err = info.value
    assert isinstance(err, LeaseConflictError)
    assert isinstance(err, ToolException)
    assert (err.agent_id, err.resource_path, err.reason) == (OLD, "FILE:/a", "WAIT_TIMEOUT")
    assert err.wait_time_ms is not None and 0 < err.wait_time_ms <= 5_000
    assert [(c.agent_id, c.resource) for c in err.conflicts] == [(YOUNG, "FILE:/a")]
    assert "young (session y) holds MUTATES on FILE:/a" in str(err)


def test_tool_error_below_tool_becomes_an_error_message_with_handle_tool_error(
    kw: Klockwork,
) -> None:
    kw.leases.acquire(OLD, "o", ("FILE:/a", "MUTATES"), 5_000)
    writer = make_writer(kw, timeout_s=0.05)
    with pytest.raises(KlockConflictError) as info:
        writer.invoke({"path": "/a"}, config=agent_config(YOUNG, "y"))
    assert info.value.reason == "DIE"

    writer.handle_tool_error = True
    call = {"type": "tool_call", "id": "c1", "name": "write_file", "args": {"path": "/a"}}
    message = writer.invoke(call, config=agent_config(YOUNG, "y"))
    assert message.status == "error"
    assert message.tool_call_id == "c1"
    assert "old (session o) holds MUTATES on FILE:/a" in message.content


async def test_async_twin_waits_without_blocking_the_loop(kw: Klockwork) -> None:
    probe = Probe()

    @tool
    @klock_protected("FILE:{path}", kw=kw, timeout_s=2.0)
    async def awrite(path: str) -> str:
        """Write a file, asynchronously."""
        probe.enter()
        await asyncio.sleep(0.01)
        probe.leave()
        return "written"

    held = await kw.leases.aacquire(YOUNG, "y", ("FILE:/a", "MUTATES"), 5_000)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    released = release_later(kw, [held.lease.lease_id], 0.2)
    out = await awrite.ainvoke({"path": "/a"}, config=agent_config(OLD, "o"))
    ticking.cancel()
    assert out == "written"
    assert probe.starts[0] >= released[0]
    assert ticks >= 5  # the loop kept running while the call waited
    assert kw.leases.list() == []


async def test_async_concurrent_calls_are_serialised(kw: Klockwork) -> None:
    probe = Probe()

    @klock_protected("FILE:{path}", kw=kw, timeout_s=2.0)
    async def awrite(path: str) -> str:
        probe.enter()
        await asyncio.sleep(0.05)
        probe.leave()
        return "written"

    assert await asyncio.gather(awrite("/a"), awrite("/a"), awrite("/a")) == ["written"] * 3
    assert probe.max_inside == 1


class WriteTool(BaseTool):
    name: str = "write_tool"
    description: str = "Write a file."
    kw: Any = None

    @klock_protected("FILE:{path}", timeout_s=0.05)
    def _run(self, path: str, run_manager: CallbackManagerForToolRun | None = None) -> str:
        assert run_manager is not None  # LangChain still sees the run_manager parameter
        return f"sync {[lease.agent_id for lease in self.kw.leases.list()]}"

    @klock_protected("FILE:{path}", timeout_s=0.05)
    async def _arun(self, path: str) -> str:
        return f"async {[lease.agent_id for lease in self.kw.leases.list()]}"


def test_basetool_run_and_arun_methods(kw: Klockwork) -> None:
    Klockwork.set_default(kw)  # the methods above were decorated without kw=
    try:
        write_tool = WriteTool(kw=kw)
        assert write_tool.invoke({"path": "/a"}, config=agent_config("w")) == "sync ['w']"
        assert asyncio.run(write_tool.ainvoke({"path": "/a"}, config=agent_config("w"))) == (
            "async ['w']"
        )
        assert set(write_tool.args) == {"path"}  # self and run_manager are not tool input
        kw.leases.acquire(OLD, "o", ("FILE:/a", "MUTATES"), 5_000)
        with pytest.raises(KlockConflictError):
            write_tool.invoke({"path": "/a"}, config=agent_config(YOUNG))
    finally:
        Klockwork.set_default(None)


# -- Klock's own signature -----------------------------------------------------------
def test_klock_signature_with_klock_client_positional(kw: Klockwork) -> None:
    client = KlockClient(kw)
    client.register_agent("agent-a", 5)

    @tool
    @klock_protected(client, "agent-a", "session-1", "FILE", lambda kwargs: kwargs["path"])
    def write_file(path: str) -> str:
        """Write a file."""
        return str([(d["agent_id"], d["resource"]) for d in client.list_leases()])

    assert write_file.invoke({"path": "/src/a.py"}) == "[('agent-a', 'FILE:/src/a.py')]"
    assert client.list_leases() == []


def test_klock_signature_keywords_and_conflict_error(kw: Klockwork) -> None:
    client = KlockClient(kw)
    kw.leases.acquire(YOUNG, "y", ("FILE:/a", "MUTATES"), 5_000)
    protect = klock_protected(
        klock_client=client,
        agent_id=OLD,
        session_id="o",
        resource_type="FILE",
        resource_path_extractor=lambda kwargs: kwargs["path"],
        predicate="MUTATES",
        ttl_ms=60_000,
        max_retries=0,
    )

    @protect
    def write(path: str) -> str:
        return "ran"

    started = time.monotonic()
    with pytest.raises(KlockConflictError) as info:
        write(path="/a")
    assert time.monotonic() - started < 0.5  # max_retries=0: one attempt only
    err = info.value
    assert (err.agent_id, err.resource_path, err.reason) == (OLD, "/a", "WAIT_TIMEOUT")


def test_klock_extractor_without_a_path_is_a_value_error(kw: Klockwork) -> None:
    @klock_protected(kw, "a", "s", "FILE", lambda kwargs: kwargs.get("path"))
    def write(path: str | None = None) -> str:
        return "ran"

    with pytest.raises(ValueError, match="resource_path_extractor"):
        write()


def test_klock_max_retries_is_a_time_budget(kw: Klockwork) -> None:
    def noop(path: str) -> str:
        return "ran"

    protector = klock_protected(kw, OLD, "o", "FILE", lambda k: k["path"], max_retries=7)
    assert protector.guard.timeout_s == 7 * RETRY_BUDGET_S
    # One retry's budget (1 s) covers a holder that releases after 0.2 s.
    held = kw.leases.acquire(YOUNG, "y", ("FILE:/a", "MUTATES"), 5_000)
    release_later(kw, [held.lease.lease_id], 0.2)
    one_retry = klock_protected(kw, OLD, "o", "FILE", lambda k: k["path"], max_retries=1)
    assert one_retry(noop)(path="/a") == "ran"


def test_klock_signature_rejects_a_foreign_client() -> None:
    with pytest.raises(ValueError, match="klock_client"):
        klock_protected(
            klock_client=object(),
            agent_id="a",
            session_id="s",
            resource_type="FILE",
            resource_path_extractor=lambda k: "x",
        )


def test_bad_options_fail_at_decoration_time(kw: Klockwork) -> None:
    with pytest.raises(ValueError, match="predicate"):
        klock_protected("FILE:{path}", predicate="WRITES", kw=kw)
    with pytest.raises(ValueError, match="on_conflict"):
        klock_protected("FILE:{path}", on_conflict="ignore", kw=kw)
    with pytest.raises(ValueError, match="ttl_ms"):
        klock_protected("FILE:{path}", ttl_ms=0, kw=kw)

    def tool_function(path: str, text: str) -> str:
        """A tool function handed over by a bare @klock_protected."""
        return text

    with pytest.raises(ValueError, match="needs a resource"):
        klock_protected(tool_function)
