"""A lost reply, for the Redis store's tests: the command ran, its answer never came back."""

from __future__ import annotations

from typing import Any

from klockwork import RedisStore

__all__ = ["LoseFirstReply"]


class LoseFirstReply:
    """Wraps a script: the first call of ``source`` runs on the server, then its reply is lost."""

    def __init__(self, store: RedisStore, source: str, error: type[Exception]) -> None:
        self.calls = 0
        self._error = error
        conn = store._conn
        real, areal = conn.script, conn.ascript

        def script(src: str) -> Any:
            found = real(src)
            if src != source:
                return found

            def call(**kw: Any) -> Any:
                self.calls += 1
                reply = found(**kw)
                if self.calls == 1:
                    raise self._error("reply lost")
                return reply

            return call

        def ascript(src: str) -> Any:
            found = areal(src)
            if src != source:
                return found

            async def call(**kw: Any) -> Any:
                self.calls += 1
                reply = await found(**kw)
                if self.calls == 1:
                    raise self._error("reply lost")
                return reply

            return call

        conn.script = script  # type: ignore[method-assign]
        conn.ascript = ascript  # type: ignore[method-assign]
