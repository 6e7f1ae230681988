"""Loading policies from YAML or JSON files shaped ``{"policies": [{...}, ...]}``.

Errors name the file, the policy (its name, or its position counting from 1)
and the field, so a bad file can be fixed without reading klockwork's code.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from klockwork.core.errors import InvalidRequestError
from klockwork.core.governance.policy import Policy

__all__ = ["load_policies", "parse_policies"]


_PROBLEMS: dict[str, Callable[[dict[str, Any]], str]] = {
    "missing": lambda ctx: "required",
    "extra_forbidden": lambda ctx: "unknown field",
    "greater_than_equal": lambda ctx: f"must be >= {ctx['ge']}",
    "greater_than": lambda ctx: f"must be > {ctx['gt']}",
    "enum": lambda ctx: f"must be one of {ctx['expected']}",
    "value_error": lambda ctx: str(ctx["error"]),
}


def _field_error(source: str, label: str, exc: ValidationError) -> InvalidRequestError:
    errors = exc.errors(include_url=False)
    # An unknown field first: a typo ("efect:") is why a required one is missing.
    err = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    where = where.lstrip(".") or "policy"
    explain = _PROBLEMS.get(err["type"])
    problem = explain(err.get("ctx") or {}) if explain else str(err["msg"])
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
        close = difflib.get_close_matches(str(err["loc"][0]), Policy.model_fields, n=1)
        if close:
            problem += f" (did you mean '{close[0]}'?)"
    elif err["type"] != "missing":
        problem += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    value = None if err["type"] == "missing" else err.get("input")
    return InvalidRequestError(where, value, f"{source}: {label}: field '{where}': {problem}{tail}")


def parse_policies(data: Any, source: str = "<policies>") -> list[Policy]:
    """Validate a ``{"policies": [{...}, ...]}`` document (what the loader parsed).

    Raises:
        InvalidRequestError: the message names ``source``, the policy (its name
            and 1-based ``#index``) and the field.
    """
    if not isinstance(data, Mapping) or set(data) != {"policies"}:
        problem = "expected a mapping with exactly one key, 'policies'"
        raise InvalidRequestError("path", source, f"{source}: {problem}")
    items = data["policies"]
    if not isinstance(items, list):
        raise InvalidRequestError("path", source, f"{source}: 'policies' must be a list")
    out: list[Policy] = []
    seen: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        name = item.get("name") if isinstance(item, Mapping) else None
        named = isinstance(name, str) and name
        label = f"policy {name!r} (#{number})" if named else f"policy #{number}"
        if not isinstance(item, Mapping):
            raise InvalidRequestError("policy", item, f"{source}: {label}: expected a mapping")
        try:
            policy = Policy.model_validate(dict(item))
        except ValidationError as exc:
            raise _field_error(source, label, exc) from None
        if policy.name in seen:
            raise InvalidRequestError(
                "name",
                policy.name,
                f"{source}: {label}: field 'name': duplicate of policy #{seen[policy.name]}",
            )
        seen[policy.name] = number
        out.append(policy)
    return out


def load_policies(path: str | os.PathLike[str]) -> list[Policy]:
    """Load policies from a ``.yaml`` / ``.yml`` / ``.json`` file.

    YAML needs the optional ``pyyaml`` package (imported only here).

    Raises:
        InvalidRequestError: unreadable or malformed file, or an invalid
            policy (the message names the file, the policy and the field).
        ImportError: a YAML file but ``pyyaml`` is not installed.
    """
    source = os.fspath(path)
    suffix = os.path.splitext(source)[1].lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise InvalidRequestError("path", source, "expected a .yaml, .yml or .json file")
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise InvalidRequestError("path", source, f"cannot read: {exc.strerror}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError("path", source, f"{source}: invalid JSON: {exc}") from None
        return parse_policies(data, source)
    try:
        yaml: Any = importlib.import_module("yaml")
    except ImportError as exc:
        raise ImportError(
            f"loading {source} needs pyyaml: pip install pyyaml (or use a .json file)"
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidRequestError("path", source, f"{source}: invalid YAML: {exc}") from None
    return parse_policies(data, source)
