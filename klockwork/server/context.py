"""What every route of one server shares: the engine, the keys, the gatekeeper, the settings."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

from klockwork.core.engine import Klockwork
from klockwork.server.auth import FailureLimiter, Gatekeeper
from klockwork.server.keys import ApiKeys

__all__ = ["Server", "ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """How one server behaves.

    Attributes:
        max_failures: failed authentications one client address may make
            within ``failure_window_s`` before it gets 429 for the rest of it.
        failure_window_s: the rate limiter's sliding window.
        max_wait_s: the longest a request may block (a lease acquire, an
            approval wait, a bus long-poll); longer asks are refused (422).
        session_ttl_s: how long an inbox sign-in lasts.
        secure_cookies: send the inbox cookie only over HTTPS (set it when a
            TLS proxy is in front).
    """

    max_failures: int = 10
    failure_window_s: float = 60.0
    max_wait_s: float = 30.0
    session_ttl_s: float = 8 * 3600.0
    secure_cookies: bool = False


@dataclass
class Server:
    """One running API over one engine."""

    kw: Klockwork
    settings: ServerSettings = field(default_factory=ServerSettings)
    keys: ApiKeys = field(init=False)
    gatekeeper: Gatekeeper = field(init=False)
    #: Signs this process's inbox session cookies (a restart signs everyone out).
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    #: Set when the server is asked to stop: live streams then end by
    #: themselves (a ``closing`` event) instead of being cut at the deadline.
    closing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.keys = ApiKeys(self.kw)
        limiter = FailureLimiter(self.settings.max_failures, self.settings.failure_window_s)
        self.gatekeeper = Gatekeeper(self.kw, self.keys, limiter)
