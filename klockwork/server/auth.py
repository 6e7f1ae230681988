"""Who is asking: a request's identity comes from its API key, never from its body.

A key is presented as ``Authorization: Bearer kw_...`` (or ``X-API-Key``),
or, in the inbox, by the signed session cookie made at sign-in. Every
refusal (no key, an unknown or revoked key, a role that may not do this)
is answered 401/403 and recorded in the audit trail as ``access.denied``.

Failed sign-ins are rate limited per client address (per /64 for IPv6): after
``max_failures`` within ``window_s`` every failing request of the address
gets 429 (with ``Retry-After``) for the rest of the window, so keys cannot
be tried by the thousand; a key that is right still signs in (one machine,
or one proxy, is one address for everyone behind it).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from fastapi import Request

from klockwork.core.engine import Klockwork
from klockwork.server.errors import ApiError
from klockwork.server.keys import ApiKey, ApiKeys, Role

__all__ = ["AUDITED_REFUSALS", "FailureLimiter", "Gatekeeper"]

#: How many refusals of one key per window the audit trail records (then one
#: entry says ``audit_paused``, and the rest of the window records none).
AUDITED_REFUSALS = 100
#: How much of a refused request's path its audit entry keeps.
_PATH_KEPT = 300


class FailureLimiter:
    """Counts failed authentications per client address in a sliding window.

    Memory is bounded: at most ``max_clients`` addresses are tracked; past
    that, the address whose last failure is oldest is forgotten first (O(1)
    per failure, so a flood from many addresses cannot make each failure
    scan the table).
    """

    def __init__(
        self, max_failures: int = 10, window_s: float = 60.0, max_clients: int = 100_000
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        # Least recently failed first: eviction pops from the front.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def bucket(client: str) -> str:
        """What failures are counted under: the address, or its /64 for IPv6.

        One IPv6 host usually holds a whole /64: counting each address
        apart would give it 2**64 fresh budgets.
        """
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client)
        if times is None:
            times = self._failures[client] = deque(maxlen=self.max_failures)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def blocked_for(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: it may now)."""
        client, now = self.bucket(client), time.monotonic()
        with self._lock:
            if client not in self._failures:
                return 0.0
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                if not times:
                    del self._failures[client]
                return 0.0
            return max(0.0, times[0] + self.window_s - now)

    def failed(self, client: str) -> int:
        """Count one failure; returns how many ``client`` made within the window.

        The count saturates at ``max_failures`` (only the newest are kept).
        """
        client, now = self.bucket(client), time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            times.append(now)
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
            return len(times)


def client_of(request: Request) -> str:
    """The client's address (the socket's peer: no forwarded header is trusted)."""
    return request.client.host if request.client is not None else "unknown"


def presented_key(request: Request) -> str | None:
    """The key a request presents in its headers, if any."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key")


class Gatekeeper:
    """Authenticates requests and checks roles, auditing every refusal."""

    def __init__(self, kw: Klockwork, keys: ApiKeys, limiter: FailureLimiter) -> None:
        self._kw = kw
        self.keys = keys
        self.limiter = limiter
        # Counts key-less refusals only to bound their audit entries (never 429).
        self._keyless = FailureLimiter(limiter.max_failures + 1, limiter.window_s)
        # Counts each key's refusals only to bound their audit entries.
        self._refused = FailureLimiter(AUDITED_REFUSALS + 1, limiter.window_s)
        #: Set by the inbox: the key a session cookie stands for, if any.
        self.session_key: Callable[[Request], ApiKey | None] = lambda request: None

    def refuse(
        self,
        request: Request,
        status: int,
        type: str,
        message: str,
        key: ApiKey | None = None,
        *,
        argument: str | None = None,
        **extra: Any,
    ) -> ApiError:
        """Audit a refusal as ``access.denied`` and return the error to raise.

        ``extra`` goes into the audit entry's data (never into the answer);
        ``argument`` names the offending input in the answer. One key's
        refusals are recorded up to :data:`AUDITED_REFUSALS` per window (the
        last one says ``audit_paused``), so that a key cannot grow the trail
        without bound by asking for what it may not; the answers stay the same.
        """
        data = {
            "reason": type,
            "method": request.method,
            "path": request.url.path[:_PATH_KEPT],
            "client": client_of(request),
            **extra,
        }
        if key is not None:
            seen = self._refused.failed(key.key_id)
            if seen > AUDITED_REFUSALS:
                return ApiError(status, type, message, argument)
            if seen == AUDITED_REFUSALS:
                data["audit_paused"] = True
            data.update(key_id=key.key_id, principal=key.principal, role=key.role)
        # The principal is who asked, when known; it is not an agent id for a person.
        agent = key.principal if key is not None and key.role == "agent" else None
        self._kw.audit.record("access.denied", agent, None, data)
        return ApiError(status, type, message, argument)

    def authenticate(self, request: Request) -> ApiKey:
        """The active key of ``request``; raises 401 (or 429 when rate limited).

        A key that authenticates is let through even while its address is
        blocked: every agent and person on one machine (or behind one proxy)
        shares an address, and a neighbour's wrong key must not lock them
        out. Only what fails is answered 429 while the address is blocked,
        and not audited again (the failure that reached the limit said so).
        """
        client = client_of(request)
        presented = presented_key(request)
        key = self.keys.authenticate(presented) if presented is not None else None
        if key is None and presented is None:
            # A session cookie signs in reads only: a cookie travels with
            # requests other sites make, so it never authorises a change
            # through /v1 (the inbox's forms carry a CSRF token instead).
            safe = request.method in ("GET", "HEAD")
            key = self.session_key(request) if safe else None
        if key is not None:
            return key
        wait = self.limiter.blocked_for(client)
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"too many failed sign-ins from {client}; try again in {int(wait) + 1} s",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        if presented is None:
            raise self.refuse_keyless(request, client)
        limited = self.limiter.failed(client) >= self.limiter.max_failures
        raise self.refuse(
            request,
            401,
            "unauthenticated",
            "unknown or revoked API key",
            rate_limited=limited,
        )

    def refuse_keyless(self, request: Request, client: str) -> ApiError:
        """401 for a request with no key; audited up to the limiter's rate per address.

        A request without a key is not a guess (it is not counted towards
        429), but each would add an entry to the trail: past
        ``max_failures`` within the window an address's key-less refusals
        are answered without an entry each (the last entry says so), so
        anonymous traffic cannot grow the audit trail without bound.
        """
        seen, audited = self._keyless.failed(client), self.limiter.max_failures
        if seen > audited:
            return ApiError(401, "unauthenticated", "an API key is required")
        extra: dict[str, Any] = {"audit_paused": True} if seen == audited else {}
        return self.refuse(request, 401, "unauthenticated", "an API key is required", **extra)

    def still_valid(self, request: Request, key: ApiKey) -> bool:
        """Whether a long request (a stream, a wait) of ``key`` may go on.

        True while the key is active and, for a request signed in by the
        inbox's cookie, while that session is: a revocation or a sign-out
        ends what is still running, not only what comes next.
        """
        current = self.keys.get(key.key_id)
        if current is None or current.status != "active":
            return False
        return presented_key(request) is not None or self.session_key(request) is not None

    def require(self, *roles: Role) -> Callable[[Request], ApiKey]:
        """A FastAPI dependency: the request's key, if its role is one of ``roles``."""
        allowed = frozenset(roles)

        def dependency(request: Request) -> ApiKey:
            key = self.authenticate(request)
            if key.role not in allowed:
                raise self.refuse(
                    request,
                    403,
                    "forbidden",
                    f"the {key.role} key may not do this (needs {' or '.join(roles)})",
                    key,
                )
            request.state.key = key
            return key

        dependency.__name__ = f"require_{'_'.join(roles)}"
        return dependency
