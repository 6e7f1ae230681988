"""The pure gate decisions of ``klockwork.core.governance.policy`` (no engine, no store)."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from klockwork.core.errors import InvalidRequestError
from klockwork.core.governance import policy as policy_module
from klockwork.core.governance.policy import (
    CONDITIONS_DENIED,
    CONDITIONS_REQUIRE_APPROVAL,
    NO_POLICY,
    POLICY_DENIED,
    Condition,
    Effect,
    Operator,
    Policy,
    PolicyIndex,
    capability_allows,
    decide,
    evaluate_condition,
    get_path,
    is_subset,
    matching_policies,
    specificity,
)


def pol(name: str = "p", action: str = "pr.merge", effect: str = "allow", **kw: Any) -> Policy:
    return Policy.model_validate({"name": name, "action": action, "effect": effect, **kw})


def cond(field: str, operator: str, value: Any = None) -> Condition:
    data: dict[str, Any] = {"field": field, "operator": operator}
    if value is not None:
        data["value"] = value
    return Condition.model_validate(data)


# -- operators ------------------------------------------------------------------------

META: dict[str, Any] = {
    "n": 7,
    "f": 2.5,
    "s": "feature/login",
    "b": True,
    "none": None,
    "files": ["src/a.py", "infra/main.tf"],
    "labels": {"urgent": 1},
}

OPERATOR_CASES = [
    # (field, operator, value, expected result)
    ("n", "eq", 7, True),
    ("n", "eq", 7.0, True),
    ("n", "eq", "7", False),  # a string is not a number
    ("b", "eq", 1, False),  # a bool is not a number
    ("b", "eq", True, True),
    ("none", "eq", None, True),
    ("files", "eq", ["src/a.py", "infra/main.tf"], True),
    ("missing", "eq", None, False),  # a missing field is not null
    ("n", "ne", 8, True),
    ("n", "ne", 7, False),
    ("n", "ne", "7", True),
    ("missing", "ne", 1, False),  # missing fails every operator but exists
    ("n", "lt", 8, True),
    ("n", "lt", 7, False),
    ("n", "lt", "8", False),  # incomparable: False, no TypeError
    ("b", "lt", 5, False),
    ("f", "lt", 3, True),
    ("n", "lte", 7, True),
    ("n", "lte", 6.9, False),
    ("s", "lte", "g", True),  # two strings compare
    ("files", "lte", ["z"], False),  # containers never order
    ("n", "gt", 6, True),
    ("n", "gt", 7, False),
    ("n", "gt", None, False),
    ("missing", "gt", 0, False),
    ("n", "gte", 7, True),
    ("n", "gte", 8, False),
    ("s", "gte", 1, False),
    ("n", "in", [1, 7], True),
    ("n", "in", [1, 2], False),
    ("b", "in", [1], False),  # True is not 1
    ("s", "in", ["feature/login", "main"], True),
    ("missing", "in", [None], False),
    ("n", "not_in", [1, 2], True),
    ("n", "not_in", [7], False),
    ("missing", "not_in", [1], False),
    ("s", "contains", "login", True),
    ("s", "contains", "logout", False),
    ("s", "contains", 1, False),
    ("files", "contains", "src/a.py", True),
    ("files", "contains", "src/", False),  # list membership, not substring
    ("labels", "contains", "urgent", True),
    ("labels", "contains", "later", False),
    ("labels", "contains", ["unhashable"], False),
    ("n", "contains", 7, False),
    ("s", "matches", r"^feature/", True),
    ("s", "matches", r"^fix/", False),
    ("files", "matches", r"^infra/", True),  # any string in a list
    ("files", "matches", r"^docs/", False),
    ("n", "matches", r"7", False),  # a number is not a string
    ("missing", "matches", r".*", False),
    ("n", "exists", True, True),
    ("none", "exists", True, True),  # present, even if null
    ("missing", "exists", True, False),
    ("missing", "exists", False, True),
    ("n", "exists", False, False),
]


@pytest.mark.parametrize(("field", "op", "value", "expected"), OPERATOR_CASES)
def test_operator(field: str, op: str, value: Any, expected: bool) -> None:
    c = Condition(field=field, operator=Operator(op), value=value)
    result = evaluate_condition(c, META)
    assert result.result is expected
    assert result.field == field
    assert result.operator is Operator(op)
    assert result.expected == value


def test_every_operator_is_covered() -> None:
    assert {Operator(case[1]) for case in OPERATOR_CASES} == set(Operator)


def test_condition_result_reports_the_actual_value_or_none() -> None:
    found = evaluate_condition(cond("pr.files_changed", "lte", 50), {"pr": {"files_changed": 73}})
    assert (found.expected, found.actual, found.result) == (50, 73, False)
    missing = evaluate_condition(cond("pr.files_changed", "lte", 50), {"pr": {}})
    assert (missing.actual, missing.result) == (None, False)


def test_exists_defaults_to_must_exist() -> None:
    c = cond("pr.files", "exists")
    assert c.value is True
    assert evaluate_condition(c, {"pr": {"files": []}}).result is True
    assert evaluate_condition(c, {}).result is False


def test_regex_is_compiled_once() -> None:
    policy_module._regex.cache_clear()
    c = cond("s", "matches", r"^feat")
    for _ in range(5):
        assert evaluate_condition(c, META).result
    info = policy_module._regex.cache_info()
    assert (info.misses, info.hits) == (1, 4)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"field": "n", "operator": "eq"}, "value"),  # only exists has a default
        ({"field": "n", "operator": "exists", "value": "yes"}, "value"),
        ({"field": "n", "operator": "in", "value": "abc"}, "value"),
        ({"field": "n", "operator": "matches", "value": "("}, "value"),
        ({"field": "n", "operator": "matches", "value": 3}, "value"),
        ({"field": "n", "operator": "like", "value": 3}, "operator"),
        ({"field": "a..b", "operator": "eq", "value": 3}, "field"),
        ({"field": "", "operator": "eq", "value": 3}, "field"),
        ({"field": "n", "operator": "eq", "value": 3, "op": "eq"}, "op"),
    ],
)
def test_invalid_condition(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Condition.model_validate(data)
    assert info.value.errors()[0]["loc"] == (field,)


# -- dot paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("pr", (True, {"files": [{"path": "a.py"}, {"path": "b.py"}], "n": None, "7": "seven"})),
        ("pr.n", (True, None)),
        ("pr.files.0.path", (True, "a.py")),
        ("pr.files.1.path", (True, "b.py")),
        ("pr.files.2.path", (False, None)),  # out of range
        ("pr.files.-1", (False, None)),  # only plain indices
        ("pr.files.x", (False, None)),
        ("pr.7", (True, "seven")),  # a number is a key of a mapping
        ("pr.missing.deeper", (False, None)),
        ("title.0", (False, None)),  # strings are not indexed
        ("count.x", (False, None)),
    ],
)
def test_get_path(path: str, expected: tuple[bool, Any]) -> None:
    meta = {
        "pr": {"files": [{"path": "a.py"}, {"path": "b.py"}], "n": None, "7": "seven"},
        "title": "fix",
        "count": 3,
    }
    assert get_path(meta, path) == expected


def test_get_path_on_non_mappings() -> None:
    assert get_path(None, "a") == (False, None)
    assert get_path([["x"]], "0.0") == (True, "x")


# -- policy validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"on_fail": "allow"}, "on_fail"),
        ({"on_timeout": "require_approval"}, "on_timeout"),
        ({"quorum": 0}, "quorum"),
        ({"approvers": ["alice"], "quorum": 2}, "quorum"),
        ({"approval_timeout_s": 0}, "approval_timeout_s"),
        ({"name": " "}, "name"),
        ({"action": ""}, "action"),
        ({"agents": [""]}, "agents"),
        ({"effect": "maybe"}, "effect"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_policy(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        pol(**extra)
    assert info.value.errors()[0]["loc"] == (field,)


def test_quorum_may_exceed_approver_globs() -> None:
    assert pol(approvers=["human:*"], quorum=2).quorum == 2


def test_models_are_frozen() -> None:
    p = pol()
    with pytest.raises(ValidationError):
        p.effect = Effect.DENY  # type: ignore[misc]
    d = decide([p], "bot", "pr.merge")
    with pytest.raises(ValidationError):
        d.effect = Effect.DENY  # type: ignore[misc]


# -- specificity ----------------------------------------------------------------------


def test_specificity_order() -> None:
    policies = [
        pol("any", "*"),
        pol("short-glob", "pr.*"),
        pol("long-glob", "pr.mer*"),
        pol("exact", "pr.merge"),
        pol("exact-high", "pr.merge", priority=5),
        pol("exact-agent", "pr.merge", agents=["bot*"]),
        pol("exact-a", "pr.merge"),
    ]
    names = [p.name for p in matching_policies(policies, "bot-1", "pr.merge")]
    assert names == [
        "exact-high",  # exact, then priority
        "exact-agent",  # then naming agents
        "exact",  # then the name: exact < exact-a
        "exact-a",
        "long-glob",  # more literal characters
        "short-glob",
        "any",
    ]
    assert sorted(policies, key=specificity)[0].name == "exact-high"


def test_exact_beats_glob_even_with_lower_priority() -> None:
    policies = [pol("glob", "pr.*", "deny", priority=100), pol("exact", "pr.merge", "allow")]
    decision = decide(policies, "bot", "pr.merge")
    assert (decision.effect, decision.policy_name) == (Effect.ALLOW, "exact")


def test_longer_glob_beats_shorter_and_priority_breaks_ties() -> None:
    policies = [pol("short", "pr.*", "deny", priority=9), pol("long", "pr.merge.*", "allow")]
    assert decide(policies, "bot", "pr.merge.squash").policy_name == "long"
    tied = [pol("low", "pr.*", "deny"), pol("high", "pr.*", "allow", priority=1)]
    assert decide(tied, "bot", "pr.merge").effect is Effect.ALLOW


def test_agent_specific_beats_agent_agnostic_at_equal_priority() -> None:
    policies = [pol("all", effect="deny"), pol("reviewers", effect="allow", agents=["rev-*"])]
    assert decide(policies, "rev-1", "pr.merge").policy_name == "reviewers"
    assert decide(policies, "coder", "pr.merge").policy_name == "all"


def test_glob_semantics() -> None:
    policies = [pol("p", "pr.*")]
    assert matching_policies(policies, "a", "pr.merge")
    assert matching_policies(policies, "a", "pr.merge.squash")  # * crosses dots
    assert not matching_policies(policies, "a", "pr")
    assert not matching_policies(policies, "a", "PR.merge")  # case-sensitive
    assert matching_policies([pol("q", "pr.?erge")], "a", "pr.merge")


# -- decisions ------------------------------------------------------------------------


def test_no_policy_is_fail_closed_by_default() -> None:
    decision = decide([pol(action="pr.merge")], "bot", "deploy.prod", {})
    assert decision.effect is Effect.DENY
    assert decision.reason == NO_POLICY
    assert decision.policy is None
    assert decision.conditions_evaluated == []


@pytest.mark.parametrize(
    ("default", "effect", "reason"),
    [
        ("allow", Effect.ALLOW, None),
        (Effect.REQUIRE_APPROVAL, Effect.REQUIRE_APPROVAL, NO_POLICY),
        ("deny", Effect.DENY, NO_POLICY),
    ],
)
def test_default_effect_is_settable(default: Any, effect: Effect, reason: str | None) -> None:
    decision = decide([], "bot", "pr.merge", None, default)
    assert (decision.effect, decision.reason) == (effect, reason)


def test_bad_default_effect() -> None:
    with pytest.raises(InvalidRequestError) as info:
        decide([], "bot", "pr.merge", None, "maybe")
    assert info.value.argument == "default_effect"


def test_policy_for_other_agents_does_not_match() -> None:
    decision = decide([pol(agents=["reviewer"])], "coder", "pr.merge")
    assert decision.reason == NO_POLICY


def test_allow_without_conditions() -> None:
    decision = decide([pol()], "bot", "pr.merge")
    assert (decision.effect, decision.reason, decision.conditions_evaluated) == (
        Effect.ALLOW,
        None,
        [],
    )


@pytest.mark.parametrize(
    ("effect", "on_fail", "passes", "expected", "reason"),
    [
        ("allow", "deny", True, Effect.ALLOW, None),
        ("allow", "deny", False, Effect.DENY, CONDITIONS_DENIED),
        ("allow", "require_approval", False, Effect.REQUIRE_APPROVAL, CONDITIONS_REQUIRE_APPROVAL),
        ("require_approval", "deny", True, Effect.REQUIRE_APPROVAL, None),
        ("require_approval", "deny", False, Effect.DENY, CONDITIONS_DENIED),
    ],
)
def test_on_fail(
    effect: str, on_fail: str, passes: bool, expected: Effect, reason: str | None
) -> None:
    p = pol(effect=effect, on_fail=on_fail, conditions=[cond("n", "lte", 10)])
    decision = decide([p, pol("fallback", "*")], "bot", "pr.merge", {"n": 5 if passes else 11})
    assert (decision.effect, decision.reason, decision.policy_name) == (expected, reason, "p")


def test_on_fail_defaults_to_deny() -> None:
    decision = decide([pol(conditions=[cond("n", "eq", 1)])], "bot", "pr.merge", {})
    assert (decision.effect, decision.reason) == (Effect.DENY, CONDITIONS_DENIED)


def test_every_condition_is_reported_without_short_circuit() -> None:
    p = pol(conditions=[cond("a", "eq", 1), cond("b", "eq", 2), cond("c", "eq", 3)])
    decision = decide([p], "bot", "pr.merge", {"a": 0, "b": 2, "c": 0})
    assert [(r.field, r.actual, r.result) for r in decision.conditions_evaluated] == [
        ("a", 0, False),
        ("b", 2, True),
        ("c", 0, False),
    ]


def test_deny_without_conditions() -> None:
    policies = [pol("stop", effect="deny"), pol("go", "pr.*")]
    decision = decide(policies, "bot", "pr.merge")
    assert (decision.effect, decision.reason, decision.policy_name) == (
        Effect.DENY,
        POLICY_DENIED,
        "stop",
    )


def test_deny_conditions_decide_whether_the_deny_applies() -> None:
    deny = pol("big-deploys", "deploy.*", "deny", conditions=[cond("replicas", "gt", 10)])
    allow = pol("deploys", "deploy.*", "allow")
    policies = [deny, allow]
    # Equally specific: the name puts 'big-deploys' first.
    denied = decide(policies, "bot", "deploy.prod", {"replicas": 20})
    assert (denied.effect, denied.reason, denied.policy_name) == (
        Effect.DENY,
        POLICY_DENIED,
        "big-deploys",
    )
    assert denied.conditions_evaluated[0].actual == 20
    allowed = decide(policies, "bot", "deploy.prod", {"replicas": 2})
    assert (allowed.effect, allowed.policy_name) == (Effect.ALLOW, "deploys")
    assert allowed.conditions_evaluated == []  # only the deciding policy's conditions
    # A deny that does not apply and nothing else: the default effect.
    alone = decide([deny], "bot", "deploy.prod", {"replicas": 2})
    assert (alone.effect, alone.reason, alone.policy) == (Effect.DENY, NO_POLICY, None)
    assert decide([deny], "bot", "deploy.prod", {"replicas": 2}, "allow").effect is Effect.ALLOW


def test_only_the_most_specific_applying_policy_is_evaluated() -> None:
    specific = pol("exact", conditions=[cond("n", "lt", 5)])  # fails -> on_fail deny
    broad = pol("broad", "pr.*")  # would allow, but is never reached
    decision = decide([broad, specific], "bot", "pr.merge", {"n": 9})
    assert (decision.effect, decision.policy_name) == (Effect.DENY, "exact")


# -- the merge-PR scenario ------------------------------------------------------------

MERGE_POLICIES = [
    pol(
        "no-infra-merges",
        "pr.merge",
        "deny",
        priority=10,
        conditions=[cond("pr.files", "matches", "^infra/")],
    ),
    pol(
        "merge-prs",
        "pr.merge",
        "allow",
        on_fail="require_approval",
        conditions=[cond("pr.files_changed", "lte", 50), cond("pr.files", "exists")],
        approvers=["alice", "bob"],
        approval_timeout_s=3600,
    ),
    pol("pr-default", "pr.*", "require_approval"),
]


def pr(n: int, *files: str) -> dict[str, Any]:
    return {"pr": {"files_changed": n, "files": list(files)}}


def test_merge_small_pr_is_allowed() -> None:
    d = decide(MERGE_POLICIES, "coder", "pr.merge", pr(12, "src/a.py", "src/b.py"))
    assert (d.effect, d.policy_name, d.reason) == (Effect.ALLOW, "merge-prs", None)
    assert [
        (r.field, r.operator, r.expected, r.actual, r.result) for r in d.conditions_evaluated
    ] == [
        ("pr.files_changed", Operator.LTE, 50, 12, True),
        ("pr.files", Operator.EXISTS, True, ["src/a.py", "src/b.py"], True),
    ]


def test_merge_big_pr_needs_approval_and_says_why() -> None:
    d = decide(MERGE_POLICIES, "coder", "pr.merge", pr(73, "src/a.py"))
    assert (d.effect, d.policy_name, d.reason) == (
        Effect.REQUIRE_APPROVAL,
        "merge-prs",
        CONDITIONS_REQUIRE_APPROVAL,
    )
    failed = [r for r in d.conditions_evaluated if not r.result]
    assert [(r.field, r.expected, r.actual) for r in failed] == [("pr.files_changed", 50, 73)]
    assert d.policy is not None and d.policy.approvers == ["alice", "bob"]


@pytest.mark.parametrize("n", [3, 73])
def test_merge_touching_infra_is_denied_whatever_its_size(n: int) -> None:
    d = decide(MERGE_POLICIES, "coder", "pr.merge", pr(n, "src/a.py", "infra/main.tf"))
    assert (d.effect, d.policy_name, d.reason) == (Effect.DENY, "no-infra-merges", POLICY_DENIED)
    [r] = d.conditions_evaluated
    assert (r.expected, r.actual, r.result) == ("^infra/", ["src/a.py", "infra/main.tf"], True)


def test_merge_hiding_its_files_does_not_slip_through() -> None:
    d = decide(MERGE_POLICIES, "coder", "pr.merge", {"pr": {"files_changed": 1}})
    assert (d.effect, d.reason) == (Effect.REQUIRE_APPROVAL, CONDITIONS_REQUIRE_APPROVAL)
    assert d.conditions_evaluated[1].result is False


def test_other_pr_actions_and_other_actions() -> None:
    d = decide(MERGE_POLICIES, "coder", "pr.comment", {})
    assert (d.effect, d.policy_name, d.reason) == (Effect.REQUIRE_APPROVAL, "pr-default", None)
    d = decide(MERGE_POLICIES, "coder", "deploy.prod", pr(1, "src/a.py"))
    assert (d.effect, d.reason) == (Effect.DENY, NO_POLICY)


# -- capabilities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "action", "allowed"),
    [
        (["*"], "anything.at.all", True),
        (["pr.*"], "pr.merge", True),
        (["pr.*"], "deploy.prod", False),
        (["pr.merge"], "pr.merge", True),
        (["pr.merge"], "pr.close", False),
        (["pr.read", "issue.*"], "issue.comment", True),
        ([], "pr.merge", False),
    ],
)
def test_capability_allows(caps: list[str], action: str, allowed: bool) -> None:
    assert capability_allows(caps, action) is allowed


@pytest.mark.parametrize(
    ("child", "parent", "subset"),
    [
        (["pr.merge"], ["*"], True),
        (["*"], ["*"], True),
        (["pr.*"], ["pr.*"], True),
        (["pr.merge"], ["pr.*"], True),
        (["pr.x.*"], ["pr.*"], True),
        (["pr.merge", "issue.read"], ["pr.*", "issue.*"], True),
        (["pr.?erge"], ["pr.*"], True),
        ([], ["pr.merge"], True),
        # escalation attempts
        (["*"], ["pr.*"], False),
        (["deploy.*"], ["pr.*"], False),
        (["pr.*"], ["pr.merge"], False),
        (["pr*"], ["pr.*"], False),  # pr* also matches 'prx'
        (["pr.merge", "deploy.prod"], ["pr.*"], False),
        (["pr.merge"], [], False),
        (["pr.?"], ["pr.?"], True),
        (["pr.a*"], ["pr.?*"], False),  # true, but beyond the conservative rule: refused
    ],
)
def test_is_subset(child: list[str], parent: list[str], subset: bool) -> None:
    assert is_subset(child, parent) is subset


GLOBS = st.text(alphabet="ab.*?", max_size=5)


@settings(max_examples=500)
@given(child=GLOBS, parent=GLOBS, data=st.data())
def test_is_subset_never_escalates(child: str, parent: str, data: st.DataObject) -> None:
    if not is_subset([child], [parent]):
        return
    for _ in range(10):  # actions the child may do: fill in its wildcards
        action = "".join(
            data.draw(st.text(alphabet="ab.x", max_size=3))
            if ch == "*"
            else data.draw(st.sampled_from("ab.x"))
            if ch == "?"
            else ch
            for ch in child
        )
        assert fnmatch.fnmatchcase(action, child)
        assert fnmatch.fnmatchcase(action, parent), (child, parent, action)


# -- properties -----------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
# What a condition may compare with: JSON data a store can keep (no NaN,
# infinities or lone surrogates; Condition refuses those).
STORABLE_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",)), max_size=4), inner)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(["pr", "pr.files", "pr.files.0", "pr.n", "x.y.z", "0", "files.1"])
KEYS = st.sampled_from(["pr", "files", "n", "x", "files", "0"]) | st.text(max_size=3)
METADATA = st.dictionaries(KEYS, JSON | st.dictionaries(KEYS, JSON), max_size=4)


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    op = draw(st.sampled_from(list(Operator)))
    if op is Operator.EXISTS:
        value: Any = draw(st.booleans())
    elif op in (Operator.IN, Operator.NOT_IN):
        value = draw(st.lists(STORABLE_JSON, max_size=3))
    elif op is Operator.MATCHES:
        value = draw(st.sampled_from(["", "^a", "b$", ".*", r"\d+", "[ab]+"]))
    else:
        value = draw(STORABLE_JSON)
    return Condition(field=draw(FIELDS), operator=op, value=value)


POLICIES = st.lists(
    st.builds(
        Policy,
        # storable names: no NUL, no lone surrogate (Policy refuses those)
        name=st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            min_size=1,
            max_size=4,
        ).filter(str.strip),
        action=st.sampled_from(["pr.*", "pr.merge", "pr.m*", "pr.?erge"]),
        effect=st.sampled_from(list(Effect)),
        conditions=st.lists(conditions(), max_size=3),
        on_fail=st.sampled_from([Effect.DENY, Effect.REQUIRE_APPROVAL]),
        priority=st.integers(-2, 2),
        agents=st.sampled_from([[], ["bot"], ["b*"]]),
    ),
    max_size=5,
)


@settings(max_examples=300)
@given(policies=POLICIES, metadata=METADATA, action=st.sampled_from(["pr.merge", "pr.x", "pr."]))
def test_decide_never_raises_on_json_metadata(
    policies: list[Policy], metadata: dict[str, Any], action: str
) -> None:
    decision = decide(policies, "bot", action, metadata)
    assert decision.effect in set(Effect)
    if decision.policy is None:
        assert decision.conditions_evaluated == []
    else:
        assert len(decision.conditions_evaluated) == len(decision.policy.conditions)
        assert all(isinstance(r.result, bool) for r in decision.conditions_evaluated)


@settings(max_examples=200)
@given(
    policies=POLICIES,
    metadata=METADATA,
    action=st.text(max_size=10).filter(lambda a: not a.startswith("pr.")),
    default=st.sampled_from(list(Effect)),
)
def test_no_matching_policy_gives_the_default(
    policies: list[Policy], metadata: dict[str, Any], action: str, default: Effect
) -> None:
    decision = decide(policies, "bot", action, metadata, default)
    assert (decision.effect, decision.policy) == (default, None)
    assert decision.reason == (None if default is Effect.ALLOW else NO_POLICY)


# -- the action index ------------------------------------------------------------------
INDEX_ACTIONS = st.sampled_from(
    ["*", "pr.*", "pr.merge", "pr.m*", "pr.?erge", "p*", "[ab]*", "a", "ab", "a[", "deploy.prod"]
)


@given(
    actions=st.lists(INDEX_ACTIONS, max_size=12),
    agents=st.lists(st.sampled_from([[], ["bot"], ["b*"]]), min_size=12, max_size=12),
    action=st.sampled_from(
        ["pr.merge", "pr.mirror", "prx", "a", "ab", "a[", "b", "", "deploy.prod"]
    )
    | st.text(max_size=6),
    agent=st.sampled_from(["bot", "other"]),
)
def test_the_index_finds_exactly_what_a_scan_finds(
    actions: list[str], agents: list[list[str]], action: str, agent: str
) -> None:
    policies = [
        Policy(name=f"p{i}", action=a, effect=Effect.ALLOW, agents=agents[i])
        for i, a in enumerate(actions)
    ]
    index = PolicyIndex(policies)
    assert list(index) == policies
    assert matching_policies(index, agent, action) == matching_policies(policies, agent, action)


@given(
    actions=st.lists(INDEX_ACTIONS, max_size=12),
    split=st.integers(0, 12),
    action=st.sampled_from(["pr.merge", "prx", "a", "ab", "a[", "b", "deploy.prod"]),
)
def test_an_extended_index_is_the_index_of_all_its_policies(
    actions: list[str], split: int, action: str
) -> None:
    policies = [Policy(name=f"p{i}", action=a, effect=Effect.ALLOW) for i, a in enumerate(actions)]
    base = PolicyIndex(policies[:split])
    extended = base.extended(policies[split:])
    assert list(extended) == policies and list(base) == policies[:split]  # the base is unchanged
    assert matching_policies(extended, "bot", action) == matching_policies(policies, "bot", action)
    assert matching_policies(base, "bot", action) == matching_policies(
        policies[:split], "bot", action
    )


def test_policies_added_one_by_one_or_replaced_decide_like_a_fresh_set() -> None:
    from klockwork import Klockwork

    kw = Klockwork()
    for i in range(200):
        action = f"svc{i % 7}.*" if i % 3 else f"svc{i % 7}.run"
        kw.policies.add(Policy(name=f"p{i}", action=action, effect=Effect.DENY))
    kw.policies.add(Policy(name="p5", action="svc5.run", effect=Effect.ALLOW), replace=True)
    kw.policies.remove("p6")
    fresh = PolicyIndex(kw.policies.list())
    for n in range(8):
        for action in (f"svc{n}.run", f"svc{n}.other"):
            assert matching_policies(kw.policies.index, "bot", action) == matching_policies(
                fresh, "bot", action
            )
    assert [p.name for p in kw.policies.list()][:7] == [f"p{i}" for i in range(8) if i != 6]
    kw.close()


def test_a_gate_does_not_scan_policies_for_other_actions() -> None:
    many = [Policy(name=f"other{i}", action=f"other.{i}", effect=Effect.DENY) for i in range(5000)]
    many += [Policy(name=f"glob{i}", action=f"x{i}.*", effect=Effect.DENY) for i in range(5000)]
    index = PolicyIndex([*many, Policy(name="mine", action="pr.*", effect=Effect.ALLOW)])
    assert [p.name for p in index.candidates("pr.merge")] == ["mine"]
    assert decide(index, "bot", "pr.merge").effect is Effect.ALLOW
