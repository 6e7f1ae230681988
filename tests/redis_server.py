"""A ``redis-server`` a test starts, kills and restarts itself (fault and multi-host tests).

Never the shared server of ``KLOCKWORK_TEST_REDIS_URL``: every
:class:`RedisServer` runs on a free port of its own, in a directory of the
test's (``tmp_path``), and is killed at teardown, so a test may SIGKILL it,
restart it from its append-only file or make it a replica without touching
anyone else's data.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["REDIS_SERVER", "RedisServer", "free_port", "redis_server_available"]

#: The server binary the tests start (Debian's ``redis-server`` package).
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1`` (plus ``bind``), started by a test.

    Args:
        directory: where the server keeps its files (``--dir``): the
            append-only file survives :meth:`kill` so :meth:`start` restores it.
        aof: ``--appendonly yes --appendfsync always`` (every write on disk
            before the reply), else no persistence at all (``--save ""
            --appendonly no``).
        bind: addresses to listen on besides ``127.0.0.1``.
        extra: more ``redis-server`` arguments (``--replicaof host port``).
    """

    def __init__(
        self,
        directory: Path,
        *,
        aof: bool = False,
        bind: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.bind = ["127.0.0.1", *bind]
        self.extra = list(extra)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.directory / "redis.log"

    def url(self, namespace: str, host: str = "127.0.0.1") -> str:
        """The store URL of this server, database 0, in ``namespace``."""
        return f"redis://{host}:{self.port}/0?namespace={namespace}"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        restart = bool(self.port)  # a restart keeps its port: clients reconnect to it
        for _ in range(1 if restart else 5):
            if not restart:
                self.port = free_port()
            args = [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", *self.bind,
                "--protected-mode", "no",
                "--dir", str(self.directory),
                "--save", "",
                "--daemonize", "no",
                "--logfile", str(self._log),
            ]  # fmt: skip
            if self.aof:
                args += ["--appendonly", "yes", "--appendfsync", "always"]
            else:
                args += ["--appendonly", "no"]
            self.proc = subprocess.Popen(
                [*args, *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready(timeout_s):
                return
            self.kill()  # the port was taken meanwhile: try another
        raise RuntimeError(f"redis-server did not start; log:\n{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        import redis

        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.BusyLoadingError:
                    pass  # replaying its append-only file: not yet
                except redis.ConnectionError:
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save (what a crash or an OOM kill does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        """Kill the server if it runs, then start it again on the same port."""
        self.kill()
        port = self.port
        self.start()
        assert self.port == port, "restarted on another port"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def redis_server_available() -> bool:
    """Whether this machine has a ``redis-server`` binary the tests can start."""
    return os.access(REDIS_SERVER, os.X_OK)
