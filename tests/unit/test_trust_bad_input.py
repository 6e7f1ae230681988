"""Bad input on every public entry point: a typed error naming the argument, nothing else.

A compact version of ``../shared/probes/p4_fuzz.py``: each argument of each
public call is replaced by each odd value (wrong types, int64 bounds, NaN,
NUL, lone surrogates, bytes, hostile ``repr``, deep nesting...) while the
others stay valid. The call must either work or raise a ``KlockworkError``
(never a ``TypeError``, ``OverflowError``, ``RecursionError``, pydantic's
``ValidationError`` or a hang), and a refusal must be an
``InvalidRequestError`` whenever the value is not something the call
accepts. Also the policy-file loader's hostile files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from klockwork import InvalidRequestError, Klockwork, KlockworkError, Policy, SqliteStore


class Hostile:
    """A value whose repr and equality raise (error messages must survive it)."""

    def __repr__(self) -> str:
        raise RuntimeError("repr boom")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq boom")

    __hash__ = object.__hash__


def _deep(n: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    cur = root
    for _ in range(n):
        cur["k"] = {}
        cur = cur["k"]
    return root


ODD: dict[str, Any] = {
    "None": None,
    "True": True,
    "2**63": 2**63,
    "-2**63-1": -(2**63) - 1,
    "10**400": 10**400,
    "nan": math.nan,
    "inf": math.inf,
    "empty": "",
    "NUL": "a\x00b",
    "surrogate": "ab\ud800cd",
    "bytes": b"abc",
    "list": [1],
    "dict": {"a": 1},
    "object": object(),
    "hostile": Hostile(),
    "deep": _deep(3000),
    "set": {1, 2},
}


def _engine(store: str, tmp_path: Path) -> Klockwork:
    if store == "memory":
        kw = Klockwork(audit_key="k")
    else:
        kw = Klockwork(SqliteStore(tmp_path / f"kw-{len(os.listdir(tmp_path))}.db"), audit_key="k")
    kw.policies.add(Policy(name="ok", action="act.*", effect="allow"))
    kw.policies.add(
        Policy(name="ask", action="ask.*", effect="require_approval", approval_timeout_s=60)
    )
    return kw


Call = Callable[..., Any]


def _enter(block: Any) -> None:
    with block:
        pass


# name -> (call(kw, ctx, **args), valid args; a callable value is read from the context)
ENTRY_POINTS: dict[str, tuple[Call, dict[str, Any]]] = {
    "leases.try_acquire": (
        lambda kw, c, **a: kw.leases.try_acquire(**a),
        {"agent_id": "a", "session_id": "s", "intents": ("FILE:/x", "MUTATES"), "ttl_ms": 1000},
    ),
    "leases.acquire": (
        lambda kw, c, **a: kw.leases.acquire("a", "s", ("FILE:/x", "MUTATES"), **a),
        {"ttl_ms": 1000, "timeout_s": 0.05},
    ),
    "leases.release": (lambda kw, c, **a: kw.leases.release(**a), {"lease_id": "lease"}),
    "leases.heartbeat": (
        lambda kw, c, **a: kw.leases.heartbeat(**a),
        {"lease_id": "lease", "ttl_ms": 1000},
    ),
    "leases.revoke": (
        lambda kw, c, **a: kw.leases.revoke(**a),
        {"lease_id": "lease", "reason": "r"},
    ),
    "leases.get": (lambda kw, c, **a: kw.leases.get(**a), {"lease_id": "lease"}),
    "leases.list": (
        lambda kw, c, **a: kw.leases.list(**a),
        {"agent_id": "holder", "resource": "FILE:/"},
    ),
    "leases.check_fencing": (
        lambda kw, c, **a: kw.leases.check_fencing(**a),
        {"resource": "FILE:/held", "token": "token"},
    ),
    "kw.lease": (
        lambda kw, c, **a: _enter(kw.lease(**a)),
        {"agent_id": "a", "session_id": "s", "resource": "FILE:/y", "auto_renew": True},
    ),
    "register_agent": (
        lambda kw, c, **a: kw.register_agent(**a),
        {"agent_id": "n", "priority": 5, "capabilities": ["act.*"]},
    ),
    "get_agent": (lambda kw, c, **a: kw.get_agent(**a), {"agent_id": "holder"}),
    "delegate": (
        lambda kw, c, **a: kw.delegate(**a).__enter__(),
        {"parent_id": "lead", "name": "r", "capabilities": ["act.x"], "ttl_s": 5},
    ),
    "revoke_agent": (
        lambda kw, c, **a: kw.revoke_agent(**a),
        {"agent_id": "holder", "reason": "r"},
    ),
    "gates.execute": (
        lambda kw, c, **a: kw.gates.execute(**a),
        {"agent_id": "a", "action": "act.x", "metadata": {"k": 1}, "event_id": "e1"},
    ),
    "gates.gate": (
        lambda kw, c, **a: kw.gates.gate(**a),
        {"agent_id": "a", "action": "act.x", "metadata": {"k": 1}, "timeout_s": 0.05},
    ),
    "gates.report": (
        lambda kw, c, **a: kw.gates.report(**a),
        {"audit_event_id": "event", "status": "failure", "message": "m"},
    ),
    "gates.breaker_state": (lambda kw, c, **a: kw.gates.breaker_state(**a), {"agent_id": "a"}),
    "approvals.approve": (
        lambda kw, c, **a: kw.approvals.approve(**a),
        {"approval_id": "approval", "approver": "alice", "comment": "c"},
    ),
    "approvals.list": (lambda kw, c, **a: kw.approvals.list(**a), {"status": "pending"}),
    "approvals.wait": (
        lambda kw, c, **a: kw.approvals.wait(**a),
        {"approval_id": "approval", "timeout_s": 0.05},
    ),
    "audit.query": (
        lambda kw, c, **a: kw.audit.query(**a),
        {"kind": "lease.granted", "agent_id": "holder", "since": 0, "limit": 10},
    ),
    "audit.verify": (lambda kw, c, **a: kw.audit.verify(**a), {"against": "checkpoint"}),
    "audit.record": (
        lambda kw, c, **a: kw.audit.record(**a),
        {"kind": "tool.start", "agent_id": "a", "session_id": "s", "ts": 1},
    ),
    "audit.export": (lambda kw, c, **a: kw.audit.export(**a), {"path": "export"}),
    "policies.add": (
        lambda kw, c, **a: kw.policies.add(dict(a), replace=True),
        {"name": "p1", "action": "act.y", "effect": "allow", "quorum": 1, "priority": 0},
    ),
    "policies.remove": (lambda kw, c, **a: kw.policies.remove(**a), {"name": "ok"}),
    "Policy": (
        lambda kw, c, **a: Policy(**a),
        {"name": "p", "action": "x", "effect": "require_approval", "approval_timeout_s": 5},
    ),
    "Klockwork": (lambda kw, c, **a: Klockwork(**a).close(), {"audit_key": "k"}),
}

# Values the calls above accept by design (None for optional arguments...).
ACCEPTED = {
    ("leases.list", "agent_id", "None"),
    ("leases.list", "resource", "None"),
    ("leases.heartbeat", "ttl_ms", "None"),
    ("kw.lease", "auto_renew", "True"),  # the valid value itself
    ("gates.execute", "metadata", "dict"),  # {"a": 1} is metadata
    ("gates.gate", "metadata", "dict"),
    ("leases.acquire", "timeout_s", "None"),  # wait without a limit: not run here
    ("gates.execute", "metadata", "None"),
    ("gates.execute", "event_id", "None"),
    ("gates.gate", "metadata", "None"),
    ("gates.gate", "timeout_s", "None"),
    ("register_agent", "priority", "None"),
    ("register_agent", "capabilities", "None"),
    ("approvals.list", "status", "None"),
    ("approvals.wait", "timeout_s", "None"),
    ("audit.query", "kind", "None"),
    ("audit.query", "agent_id", "None"),
    ("audit.query", "since", "None"),
    ("audit.verify", "against", "None"),
    ("audit.record", "agent_id", "None"),
    ("audit.record", "session_id", "None"),
    ("audit.record", "ts", "None"),
    ("Policy", "approval_timeout_s", "None"),
    ("Klockwork", "audit_key", "None"),
}
# Waits that would only end on their own (None = no limit): not run.
SKIP = {("leases.acquire", "timeout_s", "None"), ("approvals.wait", "timeout_s", "None")}


def _context(kw: Klockwork, tmp_path: Path) -> dict[str, Any]:
    held = kw.leases.try_acquire("holder", "s", ("FILE:/held", "MUTATES"), 60_000).lease
    assert held is not None
    asked = kw.gates.execute("req", "ask.x", {})
    done = kw.gates.execute("req", "act.x", {})
    return {
        "lease": held.lease_id,
        "token": held.fencing_token,
        "approval": asked.approval_id,
        "event": done.audit_event_id,
        "checkpoint": kw.audit.checkpoint(),
        "export": str(tmp_path / "export.jsonl"),
    }


CASES = [
    pytest.param(name, arg, label, id=f"{name}-{arg}-{label}")
    for name, (_, valid) in ENTRY_POINTS.items()
    for arg in valid
    for label in ODD
    if (name, arg, label) not in SKIP
]


@pytest.mark.parametrize(("name", "arg", "label"), CASES)
def test_odd_values_get_a_typed_error(name: str, arg: str, label: str, tmp_path: Path) -> None:
    call, valid = ENTRY_POINTS[name]
    kw = _engine("memory", tmp_path)
    try:
        ctx = _context(kw, tmp_path)
        args = {k: (ctx[v] if isinstance(v, str) and v in ctx else v) for k, v in valid.items()}
        args[arg] = ODD[label]
        try:
            call(kw, ctx, **args)
        except InvalidRequestError as exc:
            assert exc.argument == arg or arg in exc.argument, (exc.argument, str(exc))
            str(exc)  # the message is built whatever the value's repr does
        except KlockworkError:
            pass  # a typed refusal of a well-formed value (not found, conflict...)
        else:
            assert _may_accept(name, arg, label), f"{name}({arg}={label}) was accepted"
    finally:
        kw.close()


def _may_accept(name: str, arg: str, label: str) -> bool:
    """Odd values a call takes by design; anything else must be refused."""
    if (name, arg, label) in ACCEPTED:
        return True
    if name == "audit.record" and arg == "data":
        return True  # any data is recorded, converted as documented in audit.chain
    if name == "Klockwork" and arg == "audit_key":
        return label == "bytes"  # an HMAC key is bytes
    # "" is text: an id nobody has (release -> False) or an empty comment.
    return label == "empty"


@pytest.mark.parametrize("value", [2**63, -1, True, 1.5, "1"])
def test_sqlite_refuses_ints_it_cannot_store(tmp_path: Path, value: Any) -> None:
    kw = _engine("sqlite", tmp_path)
    try:
        lease = kw.leases.try_acquire("h", "s", ("FILE:/f", "MUTATES")).lease
        assert lease is not None
        with pytest.raises(InvalidRequestError, match="token"):
            kw.leases.check_fencing("FILE:/f", value)
        with pytest.raises(InvalidRequestError, match="priority"):
            kw.register_agent("p", value if value != -1 else 2**63)
        assert kw.audit.verify().valid  # and the engine goes on
    finally:
        kw.close()


# --------------------------------------------------------------------------- policy files
def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BOMB = "\n".join(
    [
        'a: &a ["x","x","x","x","x","x","x","x","x"]',
        *(
            f"{n}: &{n} [{','.join(['*' + p] * 9)}]"
            for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "policies: *i",
    ]
)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bomb.yaml", BOMB, "more than"),
        ("deep.json", '{"policies":' + "[" * 5000 + "]" * 5000 + "}", "deeper"),
        ("deep.yaml", "policies: " + "[" * 5000 + "]" * 5000, "deeper"),
        ("latin1.yaml", b"policies: [\xff]", "UTF-8"),
        ("huge.json", json.dumps({"policies": [], "pad": "x" * (2 << 20)}), "larger"),
        (
            "inf.yaml",
            "policies: [{name: p, action: x, effect: allow, approval_timeout_s: .inf}]",
            "finite",
        ),
    ],
)
def test_hostile_policy_files_are_refused_fast(
    tmp_path: Path, name: str, content: str | bytes, problem: str
) -> None:
    path = _write(tmp_path, name, content)
    with Klockwork() as kw, pytest.raises(InvalidRequestError, match=problem):
        kw.policies.load(path)


def test_policy_paths_that_are_not_regular_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with Klockwork() as kw:
        for path in (fifo, folder):  # a FIFO would block forever on open() otherwise
            with pytest.raises(InvalidRequestError, match="regular file"):
                kw.policies.load(path)
        for bad in (True, 3, None, b"x.yaml", ""):
            with pytest.raises(InvalidRequestError, match="path"):
                kw.policies.load(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (
            "twice.yaml",
            "policies:\n  - name: a\n    action: x\n    effect: deny\n    effect: allow\n",
        ),
        (
            "twice.json",
            '{"policies": [{"name": "a", "action": "x", "effect": "deny", "effect": "allow"}]}',
        ),
    ],
)
def test_a_policy_file_saying_a_key_twice_is_refused(
    tmp_path: Path, name: str, content: str
) -> None:
    """``effect: deny`` then ``effect: allow`` must not quietly allow."""
    path = _write(tmp_path, name, content)
    with Klockwork() as kw:
        with pytest.raises(InvalidRequestError, match="twice"):
            kw.policies.load(path)
        assert kw.policies.list() == []


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "merge.yaml",
        "policies:\n  - &b {name: a, action: x, effect: allow}\n  - <<: *b\n    name: b\n",
    )
    with Klockwork() as kw:
        assert [p.name for p in kw.policies.load(path)] == ["a", "b"]
