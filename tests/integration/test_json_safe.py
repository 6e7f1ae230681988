"""``json_safe``: the gate metadata of a tool call's arguments, with a fast path for plain data."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from klockwork.integrations.langchain.approval_flow import json_safe

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(),
    st.datetimes(),
    st.uuids(),
    st.binary(max_size=4),
)
data = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(), st.integers(), st.booleans()), inner, max_size=4),
    ),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (the round trip keeps a NaN a NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=500)
@given(data)
def test_json_safe_is_the_json_round_trip(value: Any) -> None:
    assert same(json_safe(value), json.loads(json.dumps(value, default=str)))


def test_json_safe_copies_so_later_changes_do_not_reach_the_metadata() -> None:
    args: dict[str, Any] = {"path": "/a", "lines": [1, 2], "opts": {"force": True}}
    safe = json_safe(args)
    args["lines"].append(3)
    args["opts"]["force"] = False
    assert safe == {"path": "/a", "lines": [1, 2], "opts": {"force": True}}
