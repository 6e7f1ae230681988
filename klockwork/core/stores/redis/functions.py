"""Scripts run as Redis 7 functions: ``FUNCTION LOAD`` once, then ``FCALL``.

Under ``EVALSHA`` Redis runs a script from its first line on every call,
so each lease transition re-ran the shared Lua library (some 20 µs of
server time per call, half of a release). The hot path's scripts are also
functions of one library (:data:`.scripts.LEASE_LIBRARY`, built by
:func:`.lua.library`); :meth:`RedisConnection.script
<.connection.RedisConnection.script>` hands out a :class:`FunctionCall`
for them, called exactly like redis-py's ``Script`` (``keys=``, ``args=``),
with the same reply.

* **Loading.** Lazily: a call that finds no such function (``Function not
  found``: a new server, a restart without persistence, a failover to a
  server that never had it) loads the library and calls again, as
  redis-py reloads a script on ``NOSCRIPT``. A library that another
  process loaded meanwhile is fine (``already exists``).
* **Versions.** The library's and functions' names carry a digest of its
  code: processes running different versions of klockwork on one server
  each load and call their own (a library is never replaced).
* **Fallback.** A server that refuses ``FUNCTION`` (older than 7.0, an ACL
  without ``@scripting`` functions, a proxy) gets the same script through
  ``EVALSHA`` from then on; a read-only replica's refusal is an answer
  (it fails closed, as the script would).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["AsyncFunctionCall", "FunctionCall"]


def _missing(exc: Exception) -> bool:
    return "function not found" in str(exc).lower()


def _refused(exc: Exception) -> bool:
    """True when the server cannot load functions at all (fall back to EVALSHA)."""
    import redis

    if isinstance(exc, (redis.ReadOnlyError, redis.ConnectionError, redis.TimeoutError)):
        return False  # an answer about the server's state, not about functions
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return True
    text = str(exc).lower()
    return "unknown command" in text or "unknown subcommand" in text


class _Function:
    """What the sync and async calls share: the names, and what a failed load means."""

    __slots__ = ("_client", "_code", "_fallback", "_name", "source")

    def __init__(self, client: Any, code: str, name: str, source: str) -> None:
        self._client = client
        self._code = code
        self._name = name
        #: The script's EVAL source (what the fallback runs).
        self.source = source
        self._fallback: Any = None

    def _load_failed(self, exc: Exception) -> Any:
        """``FUNCTION LOAD`` failed: the EVALSHA script to fall back to, or None (loaded
        by another process meanwhile: call the function); raises what is an answer."""
        if _refused(exc):
            self._fallback = self._client.register_script(self.source)
            return self._fallback
        if "already exists" not in str(exc):
            raise exc
        return None


class FunctionCall(_Function):
    """One function of a library on the sync client; the script itself as the fallback."""

    __slots__ = ()

    def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        import redis

        if self._fallback is None:
            try:
                return self._client.fcall(self._name, len(keys), *keys, *args)
            except redis.ResponseError as exc:
                if not _missing(exc):
                    raise
            try:
                self._client.function_load(self._code)
            except redis.ResponseError as exc:
                fallback = self._load_failed(exc)
                if fallback is not None:
                    return fallback(keys=keys, args=args)
            return self._client.fcall(self._name, len(keys), *keys, *args)
        return self._fallback(keys=keys, args=args)


class AsyncFunctionCall(_Function):
    """:class:`FunctionCall` on an async (``redis.asyncio``) client."""

    __slots__ = ()

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        import redis

        if self._fallback is None:
            try:
                return await self._client.fcall(self._name, len(keys), *keys, *args)
            except redis.ResponseError as exc:
                if not _missing(exc):
                    raise
            try:
                await self._client.function_load(self._code)
            except redis.ResponseError as exc:
                fallback = self._load_failed(exc)
                if fallback is not None:
                    return await fallback(keys=keys, args=args)
            return await self._client.fcall(self._name, len(keys), *keys, *args)
        return await self._fallback(keys=keys, args=args)
