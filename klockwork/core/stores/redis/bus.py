"""The bus primitives on Redis Streams (see :mod:`klockwork.core.stores.bus_base`).

Not built yet: every primitive is still :class:`BusPrimitives`' own, so the
bus conformance tests skip the Redis store.
"""

from __future__ import annotations

from klockwork.core.stores.bus_base import BusPrimitives

__all__ = ["RedisBus"]


class RedisBus(BusPrimitives):
    """Bus primitives of :class:`~klockwork.core.stores.redis.store.RedisStore`."""
