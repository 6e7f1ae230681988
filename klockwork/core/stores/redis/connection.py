"""What every Redis part of klockwork shares: the URL, the clients, keys, scripts, errors.

The lease store, the bus and the audit trail on Redis talk to one server
through one :class:`RedisConnection`: it parses the store URL (redis-py's
spelling plus ``?namespace=``), owns a bounded sync pool and an async client
(``redis.asyncio``, so async twins never park a thread), names every key
under one hash-tagged namespace (all keys of a namespace live in one Cluster
slot, so a Lua script may touch any of them) and turns every way Redis can
fail to answer into :class:`~klockwork.StoreUnavailableError` (fail closed).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from klockwork.core.errors import InvalidRequestError, StoreUnavailableError
from klockwork.core.stores.redis.functions import AsyncFunctionCall, FunctionCall

__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_CONNECTIONS",
    "RedisConnection",
    "parse_redis_url",
]

#: The namespace of keys when the URL names none (``?namespace=...``).
DEFAULT_NAMESPACE = "klockwork"
#: Upper bound of each connection pool (sync and async) unless the URL says
#: ``?max_connections=N``: enough for every thread of a busy agent process,
#: bounded so a leak cannot exhaust the server's clients.
MAX_CONNECTIONS = 64
#: Seconds a command may take before the store gives up (fails closed).
SOCKET_TIMEOUT_S = 5.0

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def parse_redis_url(url: str) -> tuple[str, str, int]:
    """Split a store URL into (redis-py URL, namespace, max connections).

    ``redis://[user:pass@]host:port/db[?namespace=...&max_connections=N]`` and
    ``rediss://`` (TLS); every other query parameter is redis-py's own
    (``?ssl_cert_reqs=...``), passed through unchanged.

    Raises:
        InvalidRequestError: a malformed URL, namespace or pool size.
    """
    if not isinstance(url, str):
        raise InvalidRequestError("url", url, "expected a redis:// or rediss:// URL")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("redis", "rediss") or not parts.hostname:
        raise InvalidRequestError(
            "url", url, "expected redis://[user:pass@]host:port/db[?namespace=...]"
        )
    namespace, max_connections = DEFAULT_NAMESPACE, MAX_CONNECTIONS
    passed: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "namespace":
            if not _NAMESPACE.match(value) or "{" in value or "}" in value:
                raise InvalidRequestError(
                    "url", url, "namespace: 1-64 characters of letters, digits and _.:-"
                )
            namespace = value
        elif name == "max_connections":
            if not value.isdigit() or not 1 <= int(value) <= 10_000:
                raise InvalidRequestError("url", url, "max_connections: an integer 1-10000")
            max_connections = int(value)
        else:
            passed.append((name, value))
    client_url = urlunsplit(parts._replace(query=urlencode(passed)))
    return client_url, namespace, max_connections


class RedisConnection:
    """One Redis server as klockwork uses it.

    Attributes:
        url: the store URL, password masked (for messages).
        namespace: the key namespace; every key is ``{namespace}:...``.
        sync: the bounded sync client (thread-safe pool).
    """

    def __init__(self, url: str) -> None:
        import redis

        client_url, self.namespace, self._max = parse_redis_url(url)
        parts = urlsplit(url)
        self.url = url.replace(f":{parts.password}@", ":***@", 1) if parts.password else url
        self._client_url = client_url
        self._prefix = "{" + self.namespace + "}:"
        # Blocking pools: a caller beyond the bound waits for a connection
        # (up to the socket timeout) instead of failing at once.
        self.sync: redis.Redis = redis.Redis.from_pool(
            redis.BlockingConnectionPool.from_url(
                client_url,
                max_connections=self._max,
                timeout=SOCKET_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
                health_check_interval=30,
                decode_responses=False,
            )
        )
        # One async client per event loop: redis.asyncio connections are
        # bound to the loop that opened them.
        self._aio: dict[int, Any] = {}
        self._aio_lock = threading.Lock()
        self._scripts: dict[str, Any] = {}
        self._ascripts: dict[tuple[int, str], Any] = {}
        self._library = ""
        self._functions: Mapping[str, str] = {}

    def use_functions(self, library: str, functions: Mapping[str, str]) -> None:
        """Run the scripts ``functions`` names (source → function) as functions of ``library``.

        :meth:`script` and :meth:`ascript` then call them with ``FCALL``
        (see :mod:`.functions`), loading the library when the server lacks it.
        """
        self._library, self._functions = library, functions

    # -- keys -------------------------------------------------------------
    def key(self, *parts: str) -> str:
        """The key named by ``parts`` in this namespace: ``{ns}:a:b``."""
        return self._prefix + ":".join(parts)

    # -- clients ----------------------------------------------------------
    def aio(self) -> Any:
        """The async client of the running event loop (created on first use)."""
        import redis.asyncio

        loop = asyncio.get_running_loop()
        client = self._aio.get(id(loop))
        if client is None:
            with self._aio_lock:
                client = self._aio.get(id(loop))
                if client is None:
                    client = redis.asyncio.Redis.from_pool(
                        redis.asyncio.BlockingConnectionPool.from_url(
                            self._client_url,
                            max_connections=self._max,
                            timeout=SOCKET_TIMEOUT_S,
                            socket_timeout=SOCKET_TIMEOUT_S,
                            socket_connect_timeout=SOCKET_TIMEOUT_S,
                            decode_responses=False,
                        )
                    )
                    self._aio[id(loop)] = client
        return client

    def script(self, source: str) -> Any:
        """A sync script: EVALSHA, reloaded on NOSCRIPT (redis-py's ``Script``), or FCALL.

        (FCALL for a script registered with :meth:`use_functions`.)
        """
        found = self._scripts.get(source)
        if found is None:
            name = self._functions.get(source)
            if name is None:
                found = self.sync.register_script(source)
            else:
                found = FunctionCall(self.sync, self._library, name, source)
            self._scripts[source] = found
        return found

    def ascript(self, source: str) -> Any:
        """The async twin of :meth:`script`, bound to the running loop's client."""
        client = self.aio()
        key = (id(client), source)
        found = self._ascripts.get(key)
        if found is None:
            name = self._functions.get(source)
            if name is None:
                found = client.register_script(source)
            else:
                found = AsyncFunctionCall(client, self._library, name, source)
            self._ascripts[key] = found
        return found

    # -- errors -----------------------------------------------------------
    @contextmanager
    def translated(self, doing: str) -> Iterator[None]:
        """Turn every failure to answer into StoreUnavailableError (fail closed).

        Connection refused or reset, timeouts, a READONLY replica, a server
        still loading its data, out of memory, a script error: the caller gets
        no grant and no approval. Errors klockwork raises on purpose pass.
        """
        import redis

        try:
            yield
        except redis.RedisError as exc:
            raise StoreUnavailableError(
                f"redis store {self.url} could not {doing}: {type(exc).__name__}: {exc}"
            ) from exc

    @asynccontextmanager
    async def atranslated(self, doing: str) -> AsyncIterator[None]:
        """The async twin of :meth:`translated`."""
        with self.translated(doing):
            yield

    def close(self) -> None:
        """Close the pools. Idempotent; async clients of closed loops are dropped."""
        self.sync.close()
        with self._aio_lock:
            clients, self._aio = list(self._aio.values()), {}
        self._ascripts.clear()
        for client in clients:
            pool = client.connection_pool
            # A loop's connections can only be closed on that loop; if it is
            # gone, dropping the references lets them be collected.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                loop.create_task(client.aclose())
            else:
                pool.reset()
