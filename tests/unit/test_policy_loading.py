"""Loading policies from YAML / JSON files: the happy path and errors that say where."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from klockwork.core.errors import InvalidRequestError
from klockwork.core.governance.policy import (
    CONDITIONS_REQUIRE_APPROVAL,
    Effect,
    Operator,
    Policy,
    decide,
)
from klockwork.core.governance.policy_files import load_policies, parse_policies

FILES = Path(__file__).parent / "policy_files"


@pytest.mark.parametrize("name", ["merge_prs.yaml", "merge_prs.json"])
def test_load_merge_prs(name: str) -> None:
    policies = load_policies(FILES / name)
    assert [p.name for p in policies] == ["no-infra-merges", "merge-prs", "pr-default"]
    merge = policies[1]
    assert merge.effect is Effect.ALLOW
    assert merge.on_fail is Effect.REQUIRE_APPROVAL
    assert merge.approvers == ["alice", "bob"]
    assert merge.approval_timeout_s == 3600
    assert [(c.field, c.operator, c.value) for c in merge.conditions] == [
        ("pr.files_changed", Operator.LTE, 50),
        ("pr.files", Operator.EXISTS, True),  # exists defaults to must-exist
    ]
    big_pr = {"pr": {"files_changed": 73, "files": ["src/a.py"]}}
    decision = decide(policies, "coder", "pr.merge", big_pr)
    assert (decision.effect, decision.reason) == (
        Effect.REQUIRE_APPROVAL,
        CONDITIONS_REQUIRE_APPROVAL,
    )


def test_yaml_and_json_load_the_same_policies() -> None:
    assert load_policies(FILES / "merge_prs.yaml") == load_policies(str(FILES / "merge_prs.json"))


def test_yml_suffix_and_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "empty.yml"
    path.write_text("policies: []\n")
    assert load_policies(path) == []


def test_parse_policies_from_data() -> None:
    [policy] = parse_policies({"policies": [{"name": "a", "action": "*", "effect": "deny"}]})
    assert policy == Policy(name="a", action="*", effect=Effect.DENY)


# -- errors name the file, the policy and the field -----------------------------------


def write(tmp_path: Path, policies: Any, name: str = "policies.yaml") -> Path:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps({"policies": policies}))
    else:
        import yaml

        path.write_text(yaml.safe_dump({"policies": policies}))
    return path


def load_error(path: Path) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        load_policies(path)
    assert isinstance(info.value, ValueError)
    return info.value


GOOD = {"name": "ok", "action": "pr.*", "effect": "allow"}


@pytest.mark.parametrize(
    ("policy", "message", "argument"),
    [
        (
            {"action": "pr.*", "effect": "allow"},
            "policy #2: field 'name': required",
            "name",
        ),
        (
            {"name": "bad-effect", "action": "pr.*", "effect": "permit"},
            "policy 'bad-effect' (#2): field 'effect': must be one of 'allow', 'deny' or "
            "'require_approval' (got 'permit')",
            "effect",
        ),
        (
            {
                "name": "bad-op",
                "action": "pr.*",
                "effect": "allow",
                "conditions": [
                    {"field": "n", "operator": "lt", "value": 1},
                    {"field": "n", "operator": "smaller", "value": 1},
                ],
            },
            "policy 'bad-op' (#2): field 'conditions[1].operator': must be one of",
            "conditions[1].operator",
        ),
        (
            {"name": "big-prs", "action": "pr.*", "effect": "require_approval", "quorum": 0},
            "policy 'big-prs' (#2): field 'quorum': must be >= 1 (got 0)",
            "quorum",
        ),
        (
            {"name": "typo", "action": "pr.*", "effect": "allow", "aprovers": ["alice"]},
            "policy 'typo' (#2): field 'aprovers': unknown field",
            "aprovers",
        ),
        (
            {"name": "t", "action": "pr.*", "effect": "allow", "approval_timeout_s": -1},
            "policy 't' (#2): field 'approval_timeout_s': must be > 0.0 (got -1)",
            "approval_timeout_s",
        ),
        (
            {"name": "t", "action": "pr.*", "effect": "allow", "on_fail": "allow"},
            "policy 't' (#2): field 'on_fail': must be 'deny' or 'require_approval'",
            "on_fail",
        ),
        (
            {
                "name": "t",
                "action": "pr.*",
                "effect": "allow",
                "conditions": [{"field": "n", "operator": "eq"}],
            },
            "policy 't' (#2): field 'conditions[0].value': required for operator 'eq'",
            "conditions[0].value",
        ),
    ],
)
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_invalid_policy_names_file_policy_and_field(
    tmp_path: Path, policy: dict[str, Any], message: str, argument: str, suffix: str
) -> None:
    path = write(tmp_path, [GOOD, policy], "policies" + suffix)
    err = load_error(path)
    assert f"{path}: {message}" in str(err)
    assert err.argument == argument


def test_several_errors_are_counted(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, [{"name": "x", "quorum": 0}]))
    assert "policy 'x' (#1): field 'action': required (and 2 more errors)" in str(err)


def test_a_typo_names_the_unknown_field_first(tmp_path: Path) -> None:
    """``efect:`` is why ``effect`` is missing: say the typo, and what was meant."""
    path = tmp_path / "policies.yaml"
    path.write_text("policies:\n  - name: x\n    action: pr.merge\n    efect: allow\n")
    err = load_error(path)
    assert "policy 'x' (#1): field 'efect': unknown field (did you mean 'effect'?)" in str(err)
    assert err.argument == "efect"


def test_duplicate_names(tmp_path: Path) -> None:
    path = write(tmp_path, [GOOD, {**GOOD, "name": "other"}, GOOD])
    err = load_error(path)
    assert f"{path}: policy 'ok' (#3): field 'name': duplicate of policy #1" in str(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- name: a\n", "expected a mapping with exactly one key, 'policies'"),
        ("", "expected a mapping with exactly one key, 'policies'"),  # empty file: null
        ("policies: []\nversion: 2\n", "expected a mapping with exactly one key, 'policies'"),
        ("policies: {name: a}\n", "'policies' must be a list"),
        ("policies:\n  - just-a-string\n", "policy #1: expected a mapping"),
    ],
)
def test_document_shape(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    assert f"{path}: {message}" in str(load_error(path))


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text("policies:\n  - name: a\n   action: [unclosed\n")
    err = load_error(path)
    assert f"{path}: invalid YAML" in str(err)
    assert "line" in str(err)


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    path.write_text('{"policies": [}')
    err = load_error(path)
    assert f"{path}: invalid JSON" in str(err)
    assert "line 1" in str(err)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    err = load_error(tmp_path / "nope.yaml")
    assert (err.argument, err.value) == ("path", str(tmp_path / "nope.yaml"))
    toml = tmp_path / "policies.toml"
    toml.write_text("")
    assert "expected a .yaml, .yml or .json file" in str(load_error(toml))


def test_yaml_needs_pyyaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, [GOOD])
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    with pytest.raises(ImportError, match="needs pyyaml: pip install pyyaml"):
        load_policies(path)
    json_path = write(tmp_path, [GOOD], "policies.json")
    assert [p.name for p in load_policies(json_path)] == ["ok"]  # JSON needs no pyyaml
