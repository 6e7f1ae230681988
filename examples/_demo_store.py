"""Where the cross-process examples keep their shared engine: a store URL, checked.

``--url URL`` picks the store (any ``Klockwork.open`` URL); without it the
examples use a SQLite file in a temporary folder, so they run offline. A
Redis URL gets a fresh namespace per run (``?namespace=klockwork-demo-...``),
removed at the end, so a demo never meets an earlier run's state nor
leaves keys behind. If no Redis answers, :func:`demo_store` says what to
start and exits.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

#: What ``make demo-redis`` uses unless KLOCKWORK_DEMO_REDIS_URL says otherwise.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def url_argument(argv: list[str]) -> str | None:
    """The value of ``--url`` in ``argv``, if any."""
    if "--url" in argv:
        index = argv.index("--url")
        if index + 1 < len(argv):
            return argv[index + 1]
        sys.exit("--url needs a store URL, e.g. --url redis://127.0.0.1:6379/0")
    return None


@contextlib.contextmanager
def demo_store(url: str | None, name: str) -> Iterator[str]:
    """The store URL of one demo run (a temporary SQLite file when ``url`` is None)."""
    if url is None:
        with tempfile.TemporaryDirectory(prefix=f"klockwork-{name}-") as tmp:
            yield f"sqlite:///{Path(tmp) / (name + '.db')}"
        return
    if not url.startswith(("redis://", "rediss://")):
        yield url
        return
    namespace = f"klockwork-demo-{name}-{uuid.uuid4().hex[:8]}"
    client = _reachable(url)
    try:
        yield f"{url}{'&' if '?' in url else '?'}namespace={namespace}"
    finally:
        for key in client.scan_iter(match="{" + namespace + "}:*", count=1000):
            client.unlink(key)
        client.close()


def _reachable(url: str):  # type: ignore[no-untyped-def]
    try:
        import redis
    except ImportError:
        sys.exit("This demo needs redis-py: pip install 'klockwork[redis]'.")
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        sys.exit(
            f"No Redis answers at {url} ({exc}).\n"
            "Start one on this machine, e.g.\n"
            "    redis-server --port 6379 --appendonly yes\n"
            "    docker run --rm -p 127.0.0.1:6379:6379 redis:7\n"
            "or point the demo at yours: make demo-redis KLOCKWORK_DEMO_REDIS_URL=redis://host:port/db"
        )
    return client
