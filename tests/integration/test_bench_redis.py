"""``benchmarks/bench_redis.py`` keeps working: a quick run on the test server, and no server.

The quick run needs ``KLOCKWORK_TEST_REDIS_URL`` (e.g.
``redis://127.0.0.1:6379/15``): skipped without it, failing when it is set
but no server answers (CI must not pass silently). The benchmark works in a
namespace of its own and removes it; it never flushes the database.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import redis
from support import ROOT

REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
SCRIPT = ROOT / "benchmarks" / "bench_redis.py"
ROWS = (
    "Redis try_acquire+release, audited, vs redis-py Lock",
    "Redis manifest of 5 intents vs 1",
    "Redis bus publish_many→subscribe→ack, batches of 100",
    "Redis bus, batches of 100, vs redis-py streams",
    "Redis cross-process hand-off",
    "loopback PING round trip",
)


def _run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KLOCKWORK_BENCH_REDIS_URL": url, "PYTHONPATH": str(ROOT)}
    env.pop("KLOCKWORK_URL", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def _server_affinity(client: redis.Redis) -> set[int] | None:
    try:
        return set(os.sched_getaffinity(int(client.info("server")["process_id"])))
    except (OSError, KeyError, ValueError):  # not on this machine
        return None


@pytest.mark.skipif(
    not REDIS_URL,
    reason="Redis tests need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15",
)
def test_quick_run_prints_every_row_and_leaves_no_keys() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    client.ping()  # set but unreachable: fail, do not skip
    affinity = _server_affinity(client)
    done = _run(REDIS_URL, "--quick")
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "skipped" not in out, out
    for row in ROWS:
        assert row in out, f"{row!r} missing:\n{out}"
    assert re.search(r"\b(PASS|MISS)\b", out)
    found = re.search(r"namespace (bench-[0-9a-f]{32}): \d+ keys unlinked", out)
    assert found, out
    assert list(client.scan_iter(match=f"{{{found.group(1)}}}:*", count=1000)) == []
    assert _server_affinity(client) == affinity  # pinning undone
    client.close()


def test_no_server_says_what_to_start_and_exits_0() -> None:
    done = _run("redis://127.0.0.1:1/15", "--quick")  # nothing listens on port 1
    assert done.returncode == 0, done.stderr[-4000:]
    assert "redis-server" in done.stdout and "KLOCKWORK_BENCH_REDIS_URL" in done.stdout
    assert "klockwork median" not in done.stdout  # no table
