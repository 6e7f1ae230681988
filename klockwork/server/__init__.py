"""``klockwork serve``: the HTTP API and the approvals inbox (the ``server`` extra).

``create_app(kw)`` builds the FastAPI application over an engine; the
``klockwork serve`` command runs it with uvicorn. :mod:`klockwork.server.keys`
(API keys) imports no web framework, so ``klockwork keys`` works without
the extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ApiKey", "ApiKeys", "ServerSettings", "create_app"]

if TYPE_CHECKING:
    from klockwork.server.app import create_app
    from klockwork.server.context import ServerSettings
    from klockwork.server.keys import ApiKey, ApiKeys


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the keys does not need FastAPI installed.
    if name == "create_app":
        from klockwork.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from klockwork.server.context import ServerSettings

        return ServerSettings
    if name in ("ApiKey", "ApiKeys"):
        from klockwork.server import keys

        return getattr(keys, name)
    raise AttributeError(f"module 'klockwork.server' has no attribute {name!r}")
