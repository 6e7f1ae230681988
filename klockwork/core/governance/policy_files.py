"""Loading policies from YAML or JSON files shaped ``{"policies": [{...}, ...]}``.

Errors name the file, the policy (its name, or its position counting from 1)
and the field, so a bad file can be fixed without reading klockwork's code.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import stat
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from klockwork.core.errors import InvalidRequestError
from klockwork.core.governance.policy import Policy
from klockwork.core.governance.policy_errors import field_error
from klockwork.core.validation import check_path

__all__ = ["MAX_POLICY_FILE_BYTES", "MAX_POLICY_NODES", "load_policies", "parse_policies"]

#: The largest policy file read (1 MiB: thousands of policies).
MAX_POLICY_FILE_BYTES = 1 << 20
#: The most values (mappings, lists, scalars) a parsed policy file may hold,
#: counting each use of a YAML alias: a 448-byte alias bomb would otherwise
#: expand to billions.
MAX_POLICY_NODES = 100_000
#: How deeply a policy file may nest.
MAX_POLICY_DEPTH = 64


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
            raise field_error(f"{source}: {label}", exc, Policy.model_fields) from None
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

    Only a regular file of at most :data:`MAX_POLICY_FILE_BYTES` is read
    (never a FIFO or a device, which could block forever), as UTF-8, and the
    parsed document may hold at most :data:`MAX_POLICY_NODES` values nested
    at most :data:`MAX_POLICY_DEPTH` deep (YAML aliases count each time used).

    Raises:
        InvalidRequestError: unreadable or malformed file, or an invalid
            policy (the message names the file, the policy and the field).
        ImportError: a YAML file but ``pyyaml`` is not installed.
    """
    source = check_path(path)
    suffix = os.path.splitext(source)[1].lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise InvalidRequestError("path", source, "expected a .yaml, .yml or .json file")
    text = _read_text(source)
    if suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except ValueError as exc:  # JSONDecodeError, or a key given twice
            raise InvalidRequestError("path", source, f"{source}: invalid JSON: {exc}") from None
        except RecursionError:
            raise _too_deep(source) from None
    else:
        data = _parse_yaml(text, source)
    _check_shape(data, source)
    return parse_policies(data, source)


def _read_text(source: str) -> str:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InvalidRequestError("path", source, f"cannot read: {exc.strerror}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:  # a directory, FIFO or device: refused before anything reads it
        os.close(fd)
        raise InvalidRequestError("path", source, "is not a regular file")
    try:
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_POLICY_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidRequestError("path", source, f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_POLICY_FILE_BYTES:
        raise InvalidRequestError(
            "path", source, f"is larger than {MAX_POLICY_FILE_BYTES} bytes; split it"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError("path", source, f"{source}: not UTF-8 text: {exc}") from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        yaml: Any = importlib.import_module("yaml")
    except ImportError as exc:
        raise ImportError(
            f"loading {source} needs pyyaml: pip install pyyaml (or use a .json file)"
        ) from exc
    try:
        return yaml.load(text, Loader=_strict_loader(yaml))
    except yaml.YAMLError as exc:
        raise InvalidRequestError("path", source, f"{source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise _too_deep(source) from None


@functools.cache
def _strict_loader(yaml: Any) -> Any:
    """PyYAML's SafeLoader, refusing a key given twice in one mapping.

    PyYAML keeps the last value silently: ``effect: deny`` followed by
    ``effect: allow`` would allow. A policy file must say one thing.
    """

    class StrictLoader(yaml.SafeLoader):  # type: ignore[misc]
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" — keys given here override the merged ones
            key = loader.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice",
                    key_node.start_mark,
                )
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: a key given twice in one object is refused (see _strict_loader)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"found the key {key!r} twice in one object")
        obj[key] = value
    return obj


def _check_shape(data: Any, source: str) -> None:
    """Refuse a document too large or too deep, walking it without recursion.

    Shared values (YAML aliases) are walked each time they are used: that is
    the size validation and evaluation would see.
    """
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_POLICY_NODES:
            raise InvalidRequestError(
                "path", source, f"{source}: holds more than {MAX_POLICY_NODES} values"
            )
        if depth > MAX_POLICY_DEPTH:
            raise _too_deep(source)
        if isinstance(value, Mapping):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _too_deep(source: str) -> InvalidRequestError:
    return InvalidRequestError(
        "path", source, f"{source}: nests deeper than {MAX_POLICY_DEPTH} levels"
    )
