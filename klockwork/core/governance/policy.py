"""Pure gate decisions: which policy applies to an action, and what it says.

No I/O (except :func:`load_policies`), no clock, no engine. The gate asks
:func:`decide` for a :class:`PolicyDecision` and does the recording,
approving and waiting itself.

**Decision procedure** (:func:`decide`):

1. The policies whose ``action`` glob matches the action and whose
   ``agents`` globs match the agent (no ``agents`` = any agent) are ordered
   most specific first (:func:`specificity`): an exact action beats a glob;
   a glob with more literal characters beats one with fewer; then the
   higher ``priority``; then a policy naming agents beats an agent-agnostic
   one; then the name, so the order never depends on insertion.
2. The first policy that *applies* decides; no other policy is evaluated
   after it. Every condition of the deciding policy is evaluated (no
   short-circuit) and reported in ``conditions_evaluated``, so an agent can
   see what to change (e.g. that its PR touches 73 files, the limit is 50).
3. ``allow`` / ``require_approval`` policies always apply. All conditions
   hold: the policy's effect (reason ``None``). A condition fails: the
   policy's ``on_fail`` with reason ``CONDITIONS_DENIED`` (deny) or
   ``CONDITIONS_REQUIRE_APPROVAL``.
4. A ``deny`` policy's conditions say *when it applies*: "deny any PR that
   touches ``infra/``" is a deny policy with the condition ``pr.files matches
   ^infra/``. When all of them hold the action is denied (``POLICY_DENIED``);
   otherwise the deny does not apply and the next policy in the order is
   considered. Their conditions are then not reported: only the deciding
   policy's are.
5. No policy applies: the engine's ``default_effect`` (fail-closed ``deny``)
   with reason ``NO_POLICY`` (``None`` when the default is ``allow``).

**Conditions** read a dot path into the action's metadata (``pr.files.0``:
list indices are plain numbers). A missing field fails every operator except
``exists``, and comparing values of different types (``"5" lt 10``, ``True
eq 1``) is ``False``, never an error. The metadata is what the agent
reports, so a deny policy keyed on a field the agent left out does not
apply: guard the allow side too (``pr.files exists`` on the allowing
policy sends a PR that hides its files to ``on_fail``).

**Capabilities** are action globs. :func:`is_subset` decides delegation and
only says yes when it can prove the child's globs are covered (see there).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from klockwork.core.errors import InvalidRequestError
from klockwork.core.governance.globs import action_rank, is_glob, literal_prefix, matcher
from klockwork.core.governance.policy_errors import CheckedModel, enum_text
from klockwork.core.model import _build
from klockwork.core.validation import (
    INT64_MAX,
    MAX_KEY_CHARS,
    MAX_TEXT_CHARS,
    MAX_TIMEOUT_S,
    json_problem,
    text_problem,
)

__all__ = [
    "CONDITIONS_DENIED",
    "CONDITIONS_REQUIRE_APPROVAL",
    "NO_POLICY",
    "POLICY_DENIED",
    "Condition",
    "ConditionResult",
    "Effect",
    "Operator",
    "Policy",
    "PolicyDecision",
    "PolicyIndex",
    "capability_allows",
    "decide",
    "evaluate_condition",
    "get_path",
    "is_subset",
    "matching_policies",
    "specificity",
]

POLICY_DENIED = "POLICY_DENIED"
CONDITIONS_DENIED = "CONDITIONS_DENIED"
CONDITIONS_REQUIRE_APPROVAL = "CONDITIONS_REQUIRE_APPROVAL"
NO_POLICY = "NO_POLICY"


class Effect(str, enum.Enum):
    """What a policy does with a matching action."""

    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"

    def __str__(self) -> str:
        return self.value


class Operator(str, enum.Enum):
    """How a :class:`Condition` compares a metadata field with its value."""

    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LTE = "lte"
    GT = "gt"
    GTE = "gte"
    IN = "in"
    NOT_IN = "not_in"
    CONTAINS = "contains"
    MATCHES = "matches"
    EXISTS = "exists"

    def __str__(self) -> str:
        return self.value


_STRICT = ConfigDict(frozen=True, extra="forbid")
_FROZEN = ConfigDict(frozen=True)
_LISTS = (list, tuple)
_NUMBERS = frozenset({int, float})
_ALLOWED = {
    "on_fail": (Effect.DENY, Effect.REQUIRE_APPROVAL),
    "on_timeout": (Effect.DENY, Effect.ALLOW),
}
#: The most approvals a policy may require.
MAX_QUORUM = 1000
_UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "<unset>"})()


class Condition(CheckedModel):
    """One test on the action's metadata, e.g. ``pr.files_changed lte 50``.

    ``value`` is what the field is compared with: a list for ``in`` /
    ``not_in``, a regular expression for ``matches`` (``re.search``), and for
    ``exists`` a bool, ``True`` (the default) for must-exist, ``False`` for
    must-not-exist. ``contains`` is a substring test on a string, membership
    on a list, a key test on a mapping; ``matches`` on a list holds when any
    string in it matches.
    """

    model_config = _STRICT
    field: str = Field(strict=True)
    operator: Operator
    value: Any = Field(default=_UNSET, validate_default=True)

    _operator_text = field_validator("operator", mode="before")(enum_text)

    @field_validator("field")
    @classmethod
    def _check_field(cls, field: str) -> str:
        if not field or "" in field.split(".") or field != field.strip():
            raise ValueError("must be a dot path such as 'pr.files_changed'")
        problem = text_problem(field, MAX_KEY_CHARS)
        if problem is not None:
            raise ValueError(problem)
        return field

    @field_validator("value")
    @classmethod
    def _check_value(cls, value: Any, info: ValidationInfo) -> Any:
        op = info.data.get("operator")
        if op is None:  # the operator itself was invalid: reported there
            return value
        if value is _UNSET:
            if op is Operator.EXISTS:
                return True
            raise ValueError(f"required for operator '{op.value}'")
        problem = json_problem(value)
        if problem is not None:  # it is compared with JSON metadata and audited
            raise ValueError(f"must be JSON data: {problem}")
        if op is Operator.EXISTS and not isinstance(value, bool):
            raise ValueError("must be true or false for 'exists'")
        if op in (Operator.IN, Operator.NOT_IN) and not isinstance(value, _LISTS):
            raise ValueError(f"must be a list for '{op.value}'")
        if op is Operator.MATCHES:
            if not isinstance(value, str):
                raise ValueError("must be a regular expression string for 'matches'")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class Policy(CheckedModel):
    """A rule for the actions matching ``action`` (a glob such as ``pr.*``).

    ``effect`` applies when every condition holds. For ``allow`` and
    ``require_approval``, a failing condition gives ``on_fail`` instead
    (``deny`` or ``require_approval``); a ``deny`` policy whose conditions do
    not all hold does not apply (see the module docstring). ``approvers``
    (empty: anyone but the requester), ``quorum``, ``approval_timeout_s`` and
    ``on_timeout`` (``deny`` or ``allow``) govern the approvals it asks for.
    ``priority`` breaks ties between equally specific actions (higher wins).
    """

    model_config = _STRICT
    # strict: no bytes for text, no True for 1 (a typo must not pass as a value).
    name: str = Field(strict=True)
    action: str = Field(strict=True)
    agents: list[str] = Field(default_factory=list)
    effect: Effect
    conditions: list[Condition] = Field(default_factory=list)
    on_fail: Effect = Effect.DENY
    approvers: list[str] = Field(default_factory=list)
    quorum: int = Field(default=1, ge=1, le=MAX_QUORUM, strict=True)
    # Finite and bounded: an approval always ends, and its deadline fits a store's int.
    approval_timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False, strict=True
    )
    on_timeout: Effect = Effect.DENY
    priority: int = Field(default=0, ge=-INT64_MAX, le=INT64_MAX, strict=True)
    description: str = Field(default="", max_length=MAX_TEXT_CHARS, strict=True)

    _effect_text = field_validator("effect", "on_fail", "on_timeout", mode="before")(enum_text)

    @field_validator("name", "action", "agents", "approvers", "on_fail", "on_timeout")
    @classmethod
    def _check(cls, value: Any, info: ValidationInfo) -> Any:
        allowed = _ALLOWED.get(info.field_name or "")
        if allowed is not None and value not in allowed:
            raise ValueError("must be " + " or ".join(f"'{e.value}'" for e in allowed))
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            if not text.strip():
                raise ValueError(
                    "must not contain empty strings" if text is not value else "must not be empty"
                )
            problem = text_problem(text, MAX_KEY_CHARS)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("quorum")
    @classmethod
    def _check_quorum(cls, value: int, info: ValidationInfo) -> int:
        approvers = info.data.get("approvers") or []
        named = set(approvers)
        if approvers and not any(is_glob(a) for a in named) and value > len(named):
            raise ValueError(f"must be <= the {len(named)} listed approvers")
        return value


class ConditionResult(BaseModel):
    """How one condition fared: ``actual`` is the value found (None when missing)."""

    model_config = _FROZEN
    field: str
    operator: Operator
    expected: Any
    actual: Any
    result: bool


class PolicyDecision(BaseModel):
    """The verdict of :func:`decide`.

    Attributes:
        effect: ``allow``, ``deny`` or ``require_approval``.
        policy: the deciding policy; ``None`` when the default effect applied.
        reason: ``None`` when the effect is what the policy (or an ``allow``
            default) grants; otherwise ``POLICY_DENIED``,
            ``CONDITIONS_DENIED``, ``CONDITIONS_REQUIRE_APPROVAL`` or
            ``NO_POLICY``.
        conditions_evaluated: every condition of the deciding policy.
    """

    model_config = _FROZEN
    effect: Effect
    policy: Policy | None
    reason: str | None
    conditions_evaluated: list[ConditionResult]

    @property
    def policy_name(self) -> str | None:
        """Name of the deciding policy, or None."""
        return None if self.policy is None else self.policy.name


def specificity(policy: Policy) -> tuple[int, int, int, int, str]:
    """Sort key: ``sorted(policies, key=specificity)`` puts the most specific first.

    Exact action, then more literal characters in the glob, then higher
    ``priority``, then naming agents, then the name.
    """
    exact, literal = action_rank(policy.action)
    return (exact, literal, -policy.priority, 0 if policy.agents else 1, policy.name)


class PolicyIndex:
    """A policy set that finds the policies for one action without a scan of them all.

    Exact actions sit in a dict; globs sit by their literal prefix (the text
    before the first wildcard), and an action looks only at the prefixes it
    starts with. Iterating it gives the policies in the order given.
    """

    __slots__ = ("_exact", "_globs", "policies")

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self.policies = tuple(policies)
        exact: dict[str, list[Policy]] = {}
        globs: dict[str, list[Policy]] = {}
        for policy in self.policies:
            if is_glob(policy.action):
                globs.setdefault(literal_prefix(policy.action), []).append(policy)
            else:
                exact.setdefault(policy.action, []).append(policy)
        self._exact = exact
        self._globs = globs

    def extended(self, added: Iterable[Policy]) -> PolicyIndex:
        """A new index: these policies followed by ``added`` (this one is unchanged).

        Costs the added policies plus a shallow copy of the buckets, not a
        rebuild of every policy: adding policies one by one stays linear.
        """
        new = PolicyIndex.__new__(PolicyIndex)
        added = tuple(added)
        new.policies = self.policies + added
        exact, globs = dict(self._exact), dict(self._globs)
        for policy in added:
            if is_glob(policy.action):
                key, buckets = literal_prefix(policy.action), globs
            else:
                key, buckets = policy.action, exact
            buckets[key] = [*buckets.get(key, ()), policy]  # never mutate a published bucket
        new._exact, new._globs = exact, globs
        return new

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies)

    def __len__(self) -> int:
        return len(self.policies)

    def candidates(self, action: str) -> list[Policy]:
        """The policies whose action could match ``action`` (a superset; unordered)."""
        found = list(self._exact.get(action, ()))
        globs = self._globs
        if len(globs) <= len(action) + 1:  # fewer prefixes stored than the action has
            for prefix, group in globs.items():
                if action.startswith(prefix):
                    found.extend(group)
        else:
            for end in range(len(action) + 1):
                found.extend(globs.get(action[:end], ()))
        return found


def matching_policies(policies: Iterable[Policy], agent_id: str, action: str) -> list[Policy]:
    """The policies covering ``agent_id`` doing ``action``, most specific first.

    Given a :class:`PolicyIndex`, only the policies that could match are tested.
    """
    if isinstance(policies, PolicyIndex):
        policies = policies.candidates(action)
    found = [
        p
        for p in policies
        if matcher(p.action)(action)
        and (not p.agents or any(matcher(g)(agent_id) for g in p.agents))
    ]
    if len(found) > 1:
        found.sort(key=specificity)
    return found


def capability_allows(capabilities: Iterable[str], action: str) -> bool:
    """True when any capability glob matches the action."""
    return any(matcher(c)(action) for c in capabilities)


def _covers(parent: str, child: str) -> bool:
    if parent == "*" or parent == child:
        return True
    if not is_glob(child):  # one exact action: test it
        return bool(matcher(parent)(child))
    # A child glob matches only strings starting with its literal prefix; a
    # parent "L*" (L without wildcards) matches every string starting with L.
    stem = parent[:-1]
    return parent.endswith("*") and not is_glob(stem) and literal_prefix(child).startswith(stem)


def is_subset(child_caps: Iterable[str], parent_caps: Iterable[str]) -> bool:
    """True only when every child glob is provably covered by a parent glob.

    A parent glob covers a child glob when the parent is ``*`` or identical;
    when the child is an exact action the parent matches; or when the parent
    is ``L*`` (``L`` free of wildcards) and the child's literal prefix (up to
    its first wildcard) starts with ``L``: ``pr.*`` covers ``pr.merge``,
    ``pr.x.*`` and ``pr.*``, but not ``pr*``, ``*`` or ``deploy.*``. Anything
    else is refused, even where a smarter test might prove coverage:
    delegation must never escalate.
    """
    parents = list(parent_caps)
    return all(any(_covers(p, c) for p in parents) for c in child_caps)


# -- conditions -------------------------------------------------------------------------

_NOT_FOUND: tuple[bool, Any] = (False, None)


@functools.lru_cache(maxsize=4096)
def _split(dotted: str) -> tuple[tuple[str, int | None], ...]:
    return tuple(
        (part, int(part) if part.isascii() and part.isdigit() else None)
        for part in dotted.split(".")
    )


def get_path(metadata: Any, dotted: str) -> tuple[bool, Any]:
    """Follow ``a.b.0.c`` through mappings and lists: ``(found, value)``.

    A number indexes a list (or is a key of a mapping); ``(False, None)``
    when any step is missing.
    """
    current = metadata
    for key, index in _split(dotted):
        if type(current) is dict or isinstance(current, Mapping):
            if key not in current:
                return _NOT_FOUND
            current = current[key]
        elif index is not None and isinstance(current, _LISTS) and index < len(current):
            current = current[index]
        else:
            return _NOT_FOUND
    return (True, current)


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps bools apart from numbers, also inside lists and dicts."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, _LISTS) and isinstance(b, _LISTS):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _ordered(a: Any, b: Any) -> bool:
    """True when ``a < b`` means something: two numbers, or two values of one scalar type."""
    if type(a) in _NUMBERS and type(b) in _NUMBERS:
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if isinstance(a, int | float) and isinstance(b, int | float):
        return True
    return type(a) is type(b) and not isinstance(a, list | tuple | dict | set)


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _matches(actual: Any, pattern: Any) -> bool:
    regex = _regex(pattern) if isinstance(pattern, str) else None
    if regex is None:
        return False
    if isinstance(actual, str):
        return regex.search(actual) is not None
    if isinstance(actual, _LISTS):
        return any(isinstance(x, str) and regex.search(x) is not None for x in actual)
    return False


def _contains(actual: Any, expected: Any) -> bool:
    if isinstance(actual, str):
        return isinstance(expected, str) and expected in actual
    if isinstance(actual, _LISTS):
        return any(_same(x, expected) for x in actual)
    if isinstance(actual, Mapping):
        return expected in actual
    return False


def _member(actual: Any, expected: Any) -> bool:
    return isinstance(expected, _LISTS) and any(_same(actual, x) for x in expected)


_OPS: dict[Operator, Callable[[Any, Any], bool]] = {
    Operator.EQ: _same,
    Operator.NE: lambda a, e: not _same(a, e),
    Operator.LT: lambda a, e: _ordered(a, e) and a < e,
    Operator.LTE: lambda a, e: _ordered(a, e) and a <= e,
    Operator.GT: lambda a, e: _ordered(a, e) and a > e,
    Operator.GTE: lambda a, e: _ordered(a, e) and a >= e,
    Operator.IN: _member,
    Operator.NOT_IN: lambda a, e: isinstance(e, _LISTS) and not _member(a, e),
    Operator.CONTAINS: _contains,
    Operator.MATCHES: _matches,
}


def evaluate_condition(condition: Condition, metadata: Any) -> ConditionResult:
    """Evaluate one condition; never raises (an incomparable value is ``False``)."""
    found, actual = get_path(metadata, condition.field)
    op = condition.operator
    expected = condition.value
    if op is Operator.EXISTS:
        result = found is bool(expected)
    elif not found:
        result = False
    else:
        try:
            result = bool(_OPS[op](actual, expected))
        except Exception:  # e.g. a nesting deeper than the recursion limit
            result = False
    values = {"field": condition.field, "operator": op, "expected": expected}
    values["actual"] = actual
    values["result"] = result
    return _build(ConditionResult, values)


# -- decisions --------------------------------------------------------------------------

_EFFECTS: dict[Any, Effect] = {e.value: e for e in Effect}


def _decision(
    effect: Effect, policy: Policy | None, reason: str | None, results: list[Any]
) -> PolicyDecision:
    return _build(
        PolicyDecision,
        {"effect": effect, "policy": policy, "reason": reason, "conditions_evaluated": results},
    )


def decide(
    policies: Iterable[Policy],
    agent_id: str,
    action: str,
    metadata: Mapping[str, Any] | None = None,
    default_effect: Effect | str = Effect.DENY,
) -> PolicyDecision:
    """Decide what the gate does with ``agent_id`` doing ``action`` (module docstring).

    Raises:
        InvalidRequestError: ``default_effect`` is not an :class:`Effect`.
    """
    default = Effect.DENY if default_effect is Effect.DENY else _EFFECTS.get(default_effect)
    if default is None:
        raise InvalidRequestError(
            "default_effect", default_effect, "expected 'allow', 'deny' or 'require_approval'"
        )
    for policy in matching_policies(policies, agent_id, action):
        results = [evaluate_condition(c, metadata) for c in policy.conditions]
        holds = all(r.result for r in results)
        if policy.effect is Effect.DENY:
            if holds:
                return _decision(Effect.DENY, policy, POLICY_DENIED, results)
            continue
        if holds:
            return _decision(policy.effect, policy, None, results)
        fail = policy.on_fail
        reason = CONDITIONS_DENIED if fail is Effect.DENY else CONDITIONS_REQUIRE_APPROVAL
        return _decision(fail, policy, reason, results)
    return _decision(default, None, None if default is Effect.ALLOW else NO_POLICY, [])
