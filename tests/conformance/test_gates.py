"""Gates at the engine level, on the memory and the SQLite store.

What a user relies on: fail-closed by default, the most specific policy
decides and says why (every condition with expected and actual), ``can_i``
records nothing, ``execute`` is idempotent on ``event_id`` (also under racing
threads and processes), the circuit breaker opens, cools down and resets,
bad input names the argument and records nothing, and the audit chain stays
gapless and valid under a concurrent workload.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import run_spawned

from klockwork import (
    AuditEntry,
    BreakerConfig,
    GateDeniedError,
    InvalidRequestError,
    Klockwork,
    ManualClock,
    Policy,
)

Engine = Callable[..., Klockwork]
POLICY_FILES = Path(__file__).parent.parent / "unit" / "policy_files"


def entries(kw: Klockwork, kind: str | None = None) -> list[AuditEntry]:
    """Every audit entry (of ``kind``), after a flush."""
    kw.audit.flush()
    out: list[AuditEntry] = []
    cursor = None
    while True:
        page = kw.audit.query(kind=kind, cursor=cursor, limit=1000)
        out.extend(page.entries)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def assert_gapless(kw: Klockwork) -> list[AuditEntry]:
    all_entries = entries(kw)
    assert [e.seq for e in all_entries] == list(range(1, len(all_entries) + 1))
    result = kw.audit.verify()
    assert result.valid, result
    assert result.checked == len(all_entries)
    return all_entries


# -- policies -------------------------------------------------------------------------


def test_no_policy_is_denied_no_policy(engine: Engine) -> None:
    kw = engine()
    result = kw.gates.execute("a1", "db.drop")
    assert result.status == "denied"
    assert result.denial_reason == "NO_POLICY"
    assert result.policy_name is None
    with pytest.raises(GateDeniedError) as err:
        kw.gates.gate("a1", "db.drop")
    assert err.value.reason == "NO_POLICY"
    assert [e.kind for e in entries(kw)] == ["action.denied", "action.denied"]


def test_default_effect_allow_executes(engine: Engine) -> None:
    kw = engine(default_effect="allow")
    result = kw.gates.gate("a1", "anything.at.all")
    assert result.status == "executed"
    assert result.denial_reason is None
    assert result.audit_event_id is not None
    (entry,) = entries(kw, "action.executed")
    assert entry.data["audit_event_id"] == result.audit_event_id


def test_most_specific_policy_wins(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(Policy(name="any", action="*", effect="deny"))
    kw.policies.add(Policy(name="pr", action="pr.*", effect="require_approval"))
    kw.policies.add(Policy(name="merge", action="pr.merge", effect="allow"))
    kw.policies.add(Policy(name="pr-review", action="pr.rev*", effect="allow"))
    kw.policies.add(Policy(name="low", action="db.*", effect="deny", priority=1))
    kw.policies.add(Policy(name="high", action="db.*", effect="allow", priority=5))
    assert kw.gates.execute("a", "pr.merge").policy_name == "merge"  # exact beats glob
    assert kw.gates.execute("a", "pr.review").policy_name == "pr-review"  # longer glob
    assert kw.gates.execute("a", "pr.close").policy_name == "pr"
    assert kw.gates.execute("a", "pr.close").status == "requested"
    assert kw.gates.execute("a", "shell.rm").status == "denied"
    high = kw.gates.execute("a", "db.read")  # equally specific: priority decides
    assert (high.policy_name, high.status) == ("high", "executed")


def test_conditions_evaluated_reports_every_condition(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(
        {
            "name": "small-prs",
            "action": "pr.merge",
            "effect": "allow",
            "conditions": [
                {"field": "pr.files_changed", "operator": "lte", "value": 50},
                {"field": "pr.author", "operator": "ne", "value": "bot"},
                {"field": "pr.labels", "operator": "contains", "value": "ok"},
            ],
        }
    )
    meta = {"pr": {"files_changed": 80, "author": "ann", "labels": ["wip"]}}
    result = kw.gates.execute("a1", "pr.merge", meta)
    assert result.status == "denied"
    assert result.denial_reason == "CONDITIONS_DENIED"
    got = [
        (c.field, c.operator.value, c.expected, c.actual, c.result)
        for c in result.conditions_evaluated
    ]
    assert got == [
        ("pr.files_changed", "lte", 50, 80, False),
        ("pr.author", "ne", "bot", "ann", True),
        ("pr.labels", "contains", "ok", ["wip"], False),
    ]
    assert "pr.files_changed" in result.message and "80" in result.message
    with pytest.raises(GateDeniedError) as err:
        kw.gates.gate("a1", "pr.merge", meta)
    assert err.value.policy == "small-prs"
    assert len(err.value.conditions) == 3
    ok = kw.gates.execute(
        "a1", "pr.merge", {"pr": {"files_changed": 3, "author": "x", "labels": ["ok"]}}
    )
    assert ok.status == "executed"
    assert all(c.result for c in ok.conditions_evaluated)
    (denied, _) = entries(kw, "action.denied")
    assert [c["actual"] for c in denied.data["conditions"]] == [80, "ann", ["wip"]]


def test_deny_on_infra_beats_allow_yaml(engine: Engine) -> None:
    kw = engine()
    loaded = kw.policies.load(POLICY_FILES / "merge_prs.yaml")
    assert [p.name for p in loaded] == ["no-infra-merges", "merge-prs", "pr-default"]
    infra = {"pr": {"files_changed": 2, "files": ["infra/main.tf", "README.md"]}}
    result = kw.gates.execute("bot", "pr.merge", infra)
    assert (result.status, result.policy_name, result.denial_reason) == (
        "denied",
        "no-infra-merges",
        "POLICY_DENIED",
    )
    small = kw.gates.execute("bot", "pr.merge", {"pr": {"files_changed": 2, "files": ["a.py"]}})
    assert (small.status, small.policy_name) == ("executed", "merge-prs")
    big = kw.gates.execute("bot", "pr.merge", {"pr": {"files_changed": 99, "files": ["a.py"]}})
    assert big.status == "requested"
    assert kw.approvals.get(big.approval_id or "").approvers == ["alice", "bob"]


def test_json_load_errors_name_file_policy_field_and_load_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    kw = engine()
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "policies": [
                    {"name": "fine", "action": "a.*", "effect": "allow"},
                    {"name": "broken", "action": "b.*", "effect": "allow", "quorum": 0},
                ]
            }
        )
    )
    with pytest.raises(InvalidRequestError) as err:
        kw.policies.load(bad)
    text = str(err.value)
    assert "bad.json" in text and "broken" in text and "quorum" in text
    assert kw.policies.list() == []  # all or none
    unknown = tmp_path / "unknown.json"
    unknown.write_text(
        json.dumps({"policies": [{"name": "p", "action": "x", "effect": "allow", "colour": 1}]})
    )
    with pytest.raises(InvalidRequestError, match="colour"):
        kw.policies.load(unknown)
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps({"policies": [{"name": "fine", "action": "a.*", "effect": "allow"}]})
    )
    assert [p.name for p in kw.policies.load(good)] == ["fine"]
    with pytest.raises(InvalidRequestError, match="exist"):
        kw.policies.load(good)  # a clash without replace=True changes nothing
    assert kw.gates.execute("x", "a.b").status == "executed"


# -- can_i / execute / idempotency ----------------------------------------------------


def test_can_i_records_nothing(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(Policy(name="ask", action="deploy", effect="require_approval"))
    kw.policies.add(Policy(name="ok", action="read", effect="allow"))
    dry = kw.gates.can_i("a1", "deploy", {"env": "prod"})
    assert dry.status == "requested"
    assert dry.audit_event_id is None and dry.approval_id is None
    assert kw.gates.can_i("a1", "read").status == "executed"
    assert kw.gates.can_i("a1", "nope").denial_reason == "NO_POLICY"
    assert entries(kw) == []
    assert kw.approvals.list(status=None) == []


def test_execute_is_idempotent_on_event_id(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(Policy(name="ask", action="deploy", effect="require_approval"))
    kw.policies.add(Policy(name="ok", action="read", effect="allow"))
    first = kw.gates.execute("a1", "deploy", {"v": 1}, event_id="evt-1")
    again = kw.gates.execute("a1", "deploy", {"v": 1}, event_id="evt-1")
    assert again == first
    assert first.status == "requested"
    read1 = kw.gates.execute("a1", "read", event_id="evt-2")
    assert kw.gates.execute("a1", "read", event_id="evt-2") == read1
    assert len(kw.approvals.list(status=None)) == 1
    assert len(entries(kw, "action.requested")) == 1
    assert len(entries(kw, "action.executed")) == 1
    # without an event_id every call is a new action
    assert kw.gates.execute("a1", "read") != kw.gates.execute("a1", "read")


def test_racing_threads_with_one_event_id_create_one_approval(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(Policy(name="ask", action="deploy", effect="require_approval"))
    n = 16
    barrier = threading.Barrier(n)

    def go(_: int) -> Any:
        barrier.wait(timeout=10)
        return kw.gates.execute("a1", "deploy", {"env": "prod"}, event_id="same")

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(go, range(n)))
    assert len({r.audit_event_id for r in results}) == 1
    assert len({r.approval_id for r in results}) == 1
    assert all(r.status == "requested" for r in results)
    assert len(kw.approvals.list(status=None)) == 1
    assert len(entries(kw, "action.requested")) == 1
    assert_gapless(kw)


def _execute_same_event(url: str, rounds: int, start: Any) -> None:
    kw = Klockwork.open(url)
    try:
        kw.policies.add(Policy(name="ask", action="deploy", effect="require_approval"))
        start.wait(60)
        for _ in range(rounds):
            assert kw.gates.execute("a1", "deploy", event_id="shared").status == "requested"
    finally:
        kw.close()


@pytest.mark.slow
def test_processes_with_one_event_id_create_one_approval(tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'gates.db').resolve()}"
    Klockwork.open(url).close()
    run_spawned(_execute_same_event, [(url, 20), (url, 20)])
    with Klockwork.open(url) as kw:
        assert len(kw.approvals.list(status=None)) == 1
        assert len(entries(kw, "action.requested")) == 1
        assert_gapless(kw)


# -- circuit breaker ------------------------------------------------------------------


def test_breaker_opens_cools_down_and_resets(engine: Engine, clock: ManualClock) -> None:
    kw = engine(default_effect="allow")
    kw.gates.breaker = BreakerConfig(threshold=3, cooldown_s=10)
    ids = [kw.gates.execute("a1", "call").audit_event_id or "" for _ in range(4)]
    assert kw.gates.report(ids[0], "failure", "boom")
    assert not kw.gates.report(ids[0], "failure")  # the same action counts once
    assert kw.gates.breaker_state("a1").consecutive_failures == 1
    assert kw.gates.report(ids[1], "failure")
    assert kw.gates.execute("a1", "call").status == "executed"  # 2 < threshold
    assert kw.gates.report(ids[2], "failure")
    denied = kw.gates.execute("a1", "call")
    assert (denied.status, denied.denial_reason) == ("denied", "CIRCUIT_OPEN")
    with pytest.raises(GateDeniedError) as err:
        kw.gates.gate("a1", "call")
    assert err.value.reason == "CIRCUIT_OPEN"
    assert kw.gates.execute("a2", "call").status == "executed"  # per agent
    (opened,) = entries(kw, "breaker.opened")
    assert opened.agent_id == "a1"
    assert opened.data["consecutive_failures"] == 3
    clock.advance(10_000)  # cooldown over: half-open
    half = kw.gates.execute("a1", "call")
    assert half.status == "executed"
    kw.gates.report(half.audit_event_id or "", "failure")  # re-opens at once
    assert kw.gates.execute("a1", "call").denial_reason == "CIRCUIT_OPEN"
    assert len(entries(kw, "breaker.opened")) == 2
    kw.gates.reset_breaker("a1")
    assert kw.gates.breaker_state("a1").opened_at_ms is None
    assert kw.gates.execute("a1", "call").status == "executed"


def test_report_rejects_denied_unknown_and_bad_status(engine: Engine) -> None:
    kw = engine()
    denied = kw.gates.execute("a1", "nope")
    with pytest.raises(InvalidRequestError) as err:
        kw.gates.report(denied.audit_event_id or "", "failure")
    assert err.value.argument == "audit_event_id"
    with pytest.raises(InvalidRequestError) as err:
        kw.gates.report("act_unknown", "failure")
    assert err.value.argument == "audit_event_id"
    kw.policies.add(Policy(name="ok", action="x", effect="allow"))
    ok = kw.gates.execute("a1", "x")
    with pytest.raises(InvalidRequestError) as err:
        kw.gates.report(ok.audit_event_id or "", "exploded")
    assert err.value.argument == "status"
    assert kw.gates.breaker_state("a1").consecutive_failures == 0


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"agent_id": ""}, "agent_id"),
        ({"agent_id": 7}, "agent_id"),
        ({"action": ""}, "action"),
        ({"action": None}, "action"),
        ({"metadata": ["not", "a", "dict"]}, "metadata"),
        ({"event_id": ""}, "event_id"),
        ({"event_id": 5}, "event_id"),
    ],
)
def test_bad_gate_input_names_the_argument_and_records_nothing(
    engine: Engine, kwargs: dict[str, Any], argument: str
) -> None:
    kw = engine(default_effect="allow")
    call = {"agent_id": "a1", "action": "x", "metadata": None, "event_id": None, **kwargs}
    for fn in (kw.gates.execute, kw.gates.gate):
        with pytest.raises(InvalidRequestError) as err:
            fn(**call)
        assert err.value.argument == argument
    if argument != "event_id":
        dry = {k: v for k, v in call.items() if k != "event_id"}
        with pytest.raises(InvalidRequestError) as err:
            kw.gates.can_i(**dry)
        assert err.value.argument == argument
    assert entries(kw) == []
    assert kw.approvals.list(status=None) == []


def test_bad_timeout_names_timeout_s(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(Policy(name="ask", action="deploy", effect="require_approval"))
    with pytest.raises(InvalidRequestError) as err:
        kw.gates.gate("a1", "deploy", timeout_s=-1)
    assert err.value.argument == "timeout_s"


# -- audit under concurrency ----------------------------------------------------------


def test_mixed_workload_from_8_threads_keeps_one_gapless_chain(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(Policy(name="ok", action="read", effect="allow"))
    kw.policies.add(Policy(name="no", action="drop", effect="deny"))
    kw.policies.add(Policy(name="ask", action="deploy", effect="require_approval"))
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        agent = f"agent-{i}"
        barrier.wait(timeout=10)
        for j in range(10):
            r = kw.gates.execute(agent, "read", {"j": j})
            kw.gates.report(r.audit_event_id or "", "success" if j % 3 else "failure")
            kw.gates.execute(agent, "drop")
            asked = kw.gates.execute(agent, "deploy", event_id=f"{agent}-{j}")
            if j % 2:
                kw.approvals.approve(asked.approval_id or "", f"reviewer-{i}")
            else:
                kw.approvals.deny(asked.approval_id or "", f"reviewer-{i}", "no")
            kw.gates.execute(agent, "deploy", event_id=f"{agent}-{j}")  # settles it

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(8)))
    all_entries = assert_gapless(kw)
    kinds = [e.kind for e in all_entries]
    assert kinds.count("action.requested") == 80
    assert kinds.count("approval.decided") == 80
    # each settled request adds exactly one executed/denied entry
    assert kinds.count("action.executed") == 80 + 40
    assert kinds.count("action.denied") == 80 + 40


def _gate_many(url: str, agent: str, n: int, start: Any) -> None:
    kw = Klockwork.open(url, default_effect="allow")
    try:
        start.wait(60)
        for i in range(n):
            kw.gates.gate(agent, "read", {"i": i})
    finally:
        kw.close()


@pytest.mark.slow
def test_three_processes_gating_share_one_gapless_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{(tmp_path / 'gates.db').resolve()}"
    Klockwork.open(url).close()
    run_spawned(_gate_many, [(url, f"proc-{i}", 30) for i in range(3)])
    with Klockwork.open(url) as kw:
        all_entries = assert_gapless(kw)
        assert len(all_entries) == 90
        assert {e.agent_id for e in all_entries} == {"proc-0", "proc-1", "proc-2"}


def test_a_grant_the_audit_cannot_take_is_given_back() -> None:
    """Fail closed: an audit log that stopped working refuses the grant and frees the lease."""
    from klockwork import Klockwork, StoreUnavailableError

    kw = Klockwork()
    kw.audit.close()  # the writer is gone: every record now raises
    with pytest.raises(StoreUnavailableError):
        kw.leases.try_acquire("a", "s", ("FILE:/x", "MUTATES"))
    assert kw.leases.list() == []  # not left held until its TTL


def test_a_gate_the_audit_cannot_record_is_not_stored_as_executed() -> None:
    from klockwork import Klockwork, Policy, StoreUnavailableError

    kw = Klockwork()
    kw.policies.add(Policy(name="ok", action="tool.run", effect="allow"))
    kw.audit.close()
    for _ in range(2):  # a retry with the same event_id must fail the same way
        with pytest.raises(StoreUnavailableError):
            kw.gates.gate("a", "tool.run", event_id="e-1")


def test_outcome_tells_how_a_stored_gate_ended(engine: Engine) -> None:
    kw = engine()
    kw.policies.add(Policy(name="ask", action="deploy.*", effect="require_approval"))
    asked = kw.gates.execute("a1", "deploy.prod", {"v": 1})
    assert asked.audit_event_id is not None and asked.approval_id is not None
    pending = kw.gates.outcome(asked.audit_event_id)
    assert pending is not None and pending.pending and pending.result.status == "requested"
    kw.approvals.approve(asked.approval_id, "bob")
    done = kw.gates.outcome(asked.audit_event_id)
    again = kw.gates.outcome(asked.audit_event_id)
    assert done is not None and again is not None
    assert done.result.status == again.result.status == "executed" and not done.pending
    # Settled once: one action.executed entry, however often it is read.
    assert [e.kind for e in entries(kw, "action.executed")] == ["action.executed"]
    assert kw.gates.outcome("act_unknown") is None
