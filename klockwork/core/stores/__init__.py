"""Stores: thin atomic layers under the pure decisions of :mod:`klockwork.core.leases.rules`."""

from klockwork.core.stores.base import Store
from klockwork.core.stores.memory import MemoryStore
from klockwork.core.stores.sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore", "Store"]
