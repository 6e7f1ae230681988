"""``kw.policies``: the engine's set of gate policies.

Gates read :attr:`Policies.snapshot`, a tuple replaced as a whole on every
change, so a decision never sees half an update and needs no lock.
"""

from __future__ import annotations

import builtins
import os
import threading
from collections.abc import Mapping
from typing import Any

from klockwork.core.errors import InvalidRequestError
from klockwork.core.governance.policy import Policy, PolicyIndex
from klockwork.core.governance.policy_files import load_policies, parse_policies
from klockwork.core.validation import check_key

__all__ = ["Policies"]


class Policies:
    """The engine's policy set (``kw.policies``); thread-safe, applies to new gates at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # writers only
        self._by_name: dict[str, Policy] = {}
        #: What gates read: replaced as a whole, so readers need no lock.
        self.snapshot: tuple[Policy, ...] = ()
        #: The same policies, indexed by action (what gates decide with).
        self.index = PolicyIndex()

    def _merge(
        self, policies: builtins.list[Policy], replace: bool, argument: str, value: Any
    ) -> None:
        """Add ``policies`` all together, or none of them if one name is taken."""
        with self._lock:
            clash = [p.name for p in policies if p.name in self._by_name]
            if clash and not replace:
                raise InvalidRequestError(
                    argument, value, f"policies {clash} exist already (pass replace=True)"
                )
            merged = dict(self._by_name)
            merged.update((p.name, p) for p in policies)
            if clash or len(merged) != len(self._by_name) + len(policies):
                self._publish(merged)  # a replacement (or a name twice): rebuild in order
            else:  # only new names: extend the published index
                self._publish(merged, self.index.extended(policies))

    def _publish(self, by_name: dict[str, Policy], index: PolicyIndex | None = None) -> None:
        # Under the lock. Readers see the old or the new index, whole.
        self._by_name = by_name
        if index is None:
            index = PolicyIndex(by_name.values())
        self.snapshot, self.index = index.policies, index

    def add(self, policy: Policy | Mapping[str, Any], *, replace: bool = False) -> Policy:
        """Add a policy (a :class:`Policy` or a dict of its fields).

        Raises:
            InvalidRequestError: invalid fields, or a policy of that name
                exists and ``replace`` is False.
        """
        if isinstance(policy, Mapping):
            (policy,) = parse_policies({"policies": [dict(policy)]}, "kw.policies.add")
        if not isinstance(policy, Policy):
            raise InvalidRequestError("policy", policy, "expected a Policy or a dict")
        self._merge([policy], replace, "policy", policy.name)
        return policy

    def load(self, path: str | os.PathLike[str], *, replace: bool = False) -> builtins.list[Policy]:
        """Add every policy of a YAML/JSON file (``{"policies": [...]}``); all or none.

        Raises:
            InvalidRequestError: naming the file, the policy and the field, or
                the names that exist already (unless ``replace``).
        """
        policies = load_policies(path)
        self._merge(policies, replace, "path", os.fspath(path))
        return policies

    def remove(self, name: str) -> bool:
        """Remove a policy by name; False if there was none."""
        check_key(name, "name")
        with self._lock:
            if name not in self._by_name:
                return False
            self._publish({k: v for k, v in self._by_name.items() if k != name})
            return True

    def get(self, name: str) -> Policy | None:
        """The policy of that name, or None."""
        check_key(name, "name")
        return self._by_name.get(name)

    def list(self) -> builtins.list[Policy]:
        """Every policy, in the order added."""
        return list(self.snapshot)

    def clear(self) -> None:
        """Remove every policy (gates then apply ``default_effect``)."""
        with self._lock:
            self._publish({})
