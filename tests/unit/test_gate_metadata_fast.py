"""The gate's one-pass metadata check (``checked_plain_json``) against the checked slow way.

A gate checks its metadata, digests the action and writes the audit entry.
Plain metadata takes one pass for all three; the pass must accept only what
``check_json_object`` accepts, and give exactly the text and digest the slow
way gives (digests are stored, so their text must never change).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klockwork import InvalidRequestError, Klockwork, Policy
from klockwork.core.audit.canonical import INT_LIMIT, checked_plain_json
from klockwork.core.governance.outcomes import action_digest
from klockwork.core.validation import MAX_JSON_DEPTH, check_json_object


class Label(str):
    """A str subclass: JSON text, but not plain data as is."""


_TEXT = st.text(max_size=8)  # lone surrogates included
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-INT_LIMIT - 2, -INT_LIMIT + 2)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _TEXT
    | st.sampled_from(["\x00\x1f\x7f", "é\U0001f600", "\ud800", Label("x"), b"bytes", {1, 2}])
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(_TEXT, inner, max_size=3)
        | st.dictionaries(st.integers(0, 3), inner, max_size=2)
    ),
    max_leaves=12,
)


def slow_verdict(value: Any) -> bool:
    try:
        check_json_object(value, "metadata")
    except InvalidRequestError:
        return False
    return True


def slow_digest(agent: str, action: str, metadata: Any) -> str:
    text = json.dumps(
        [agent, action, dict(metadata or {})], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def nested(depth: int, leaf: Any) -> dict[str, Any]:
    """``leaf`` placed ``depth`` levels below the top dict (alternating dicts and lists)."""
    value: Any = leaf
    for level in range(depth - 1):
        value = {"k": value} if level % 2 else [value]
    return {"top": value}


@settings(max_examples=600, deadline=None)
@given(metadata=st.dictionaries(_TEXT, _VALUES, max_size=4), agent=_TEXT, action=_TEXT)
def test_the_one_pass_takes_only_valid_metadata_and_gives_the_slow_text(
    metadata: dict[str, Any], agent: str, action: str
) -> None:
    text = checked_plain_json(metadata, MAX_JSON_DEPTH)
    if text is None:
        return  # the gate takes the slow way, whatever it decides
    assert slow_verdict(metadata)
    assert text == json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if agent and action:
        assert action_digest(agent, action, metadata, text) == slow_digest(agent, action, metadata)


@settings(max_examples=300, deadline=None)
@given(metadata=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4))
def test_plain_text_metadata_takes_the_one_pass(metadata: dict[str, str]) -> None:
    """The common gate (text in, text out) is never sent the slow way for no reason."""
    text = checked_plain_json(metadata, MAX_JSON_DEPTH)
    assert (text is not None) == slow_verdict(metadata)


@pytest.mark.parametrize("odd", ["\x7f", "a\x00b", "é", "\U0001f600", "\ud800"])
def test_the_digest_of_text_ensure_ascii_escapes_is_json_dumpss(odd: str) -> None:
    """DEL is ASCII, yet json.dumps(ensure_ascii=True) escapes it: the stored text must."""
    metadata = {"path": odd, odd: [odd]}
    text = checked_plain_json(metadata, MAX_JSON_DEPTH)
    assert action_digest("a", "b", metadata, text) == slow_digest("a", "b", metadata)


def test_the_depth_limit_is_the_slow_checks() -> None:
    for depth in range(MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH + 3):
        for leaf in (1, "x", [], {}):
            metadata = nested(depth, leaf)
            if checked_plain_json(metadata, MAX_JSON_DEPTH) is not None:
                assert slow_verdict(metadata), (depth, leaf)
    deepest = nested(MAX_JSON_DEPTH, "leaf")
    assert slow_verdict(deepest)
    assert checked_plain_json(deepest, MAX_JSON_DEPTH) is not None
    assert not slow_verdict(nested(MAX_JSON_DEPTH + 1, "leaf"))


@pytest.mark.parametrize(
    ("metadata", "where"),
    [
        ({"path": "\ud800"}, "lone surrogate"),
        ({"n": float("nan")}, "nan"),
        ({"deep": nested(MAX_JSON_DEPTH + 1, 1)}, "deeper than"),
        ({1: "x"}, "key that is not a string"),
        ({"s": {1, 2}}, "set"),
    ],
)
def test_a_gate_refuses_bad_metadata_by_name_and_records_nothing(
    metadata: dict[Any, Any], where: str
) -> None:
    with Klockwork() as kw:
        kw.policies.add(Policy(name="all", action="*", effect="allow"))
        with pytest.raises(InvalidRequestError) as caught:
            kw.gates.execute("agent-1", "fs.write", metadata)
        assert caught.value.argument == "metadata"
        assert where in str(caught.value)
        kw.audit.flush()
        assert [e.kind for e in kw.audit.query(kind="action.executed").entries] == []


def test_a_gate_with_plain_metadata_stores_and_audits_it_exactly() -> None:
    metadata = {"tool": "write_file", "args": {"path": "/é/x", "n": 3, "ok": True, "t": None}}
    with Klockwork() as kw:
        kw.policies.add(Policy(name="all", action="*", effect="allow"))
        result = kw.gates.execute("agent-1", "fs.write", metadata, event_id="e-1")
        again = kw.gates.execute("agent-1", "fs.write", dict(metadata), event_id="e-1")
        assert again.audit_event_id == result.audit_event_id  # the same digest
        with pytest.raises(InvalidRequestError):  # another action under the same event id
            kw.gates.execute("agent-1", "fs.write", {**metadata, "tool": "rm"}, event_id="e-1")
        kw.audit.flush()
        (entry,) = kw.audit.query(kind="action.executed").entries
        assert entry.data["metadata"] == metadata
        assert kw.audit.verify().valid
