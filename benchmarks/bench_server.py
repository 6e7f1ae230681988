"""Load test of ``klockwork serve`` over loopback: leases and gates through the HTTP API.

A real server (``klockwork serve`` in a subprocess, uvicorn, one worker)
runs over a SQLite store in a temporary directory; one agent key per client
is made beforehand. N clients (asyncio tasks in this process, one keep-alive
connection each, loopback only) loop for ``--duration`` seconds:

1. acquire ``MUTATES`` on one of ``--resources`` shared resources
   (``POST /v1/leases``, ``wait_s`` small): GRANTED, or a 409
   ``lease_timeout`` when the resource stayed busy (expected under
   contention, counted, not an error);
2. when granted, hold it a moment and release it
   (``POST /v1/leases/{id}/release``, which must answer ``released: true``);
3. run a gate (``POST /v1/gates/execute``, an ``allow`` policy): ``executed``.

It prints requests/s and p50/p99 latency per operation (client side: from
sending the request to reading the whole answer) and checks two things:

* **no error**: every answer is one of the expected ones above;
* **no double grant**, two ways that cannot false-positive:

  - a shared board per resource, written under the lease: on a grant the
    client finds the board empty and the fencing token above the last one
    written, then writes its token; it clears the board *before* it sends
    the release. The clients share one event loop, so the board needs no
    lock. The server grants the next holder only after it handled that
    release, which the client sent after clearing the board: a correct
    server can never make a client find the board taken, whatever the
    scheduling (the TTL, 30 s, is far above any hold, so no lease lapses;
    a release answered ``released: false`` would say one did, and is
    counted as an error);
  - afterwards, each resource's holds sorted by fencing token: each hold
    must end (release sent) before the next begins (grant received), on
    the one monotonic clock, and no token may repeat.

The safety line says PASS or FAIL; the exit status is 0 either way (this
is a measurement; ``tests/server/test_bench_server.py`` asserts on it).

    .venv/bin/python benchmarks/bench_server.py              # 50 clients, 30 s
    .venv/bin/python benchmarks/bench_server.py --quick      # 10 clients, 3 s
    .venv/bin/python benchmarks/bench_server.py --clients 20 --duration 10 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from resource import RUSAGE_SELF, getrusage, struct_rusage
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from klockwork import Klockwork  # noqa: E402
from klockwork.server.keys import ApiKeys  # noqa: E402

TTL_MS = 30_000
OPERATIONS = ("acquire", "release", "gate")


@dataclass
class Hold:
    """One granted lease as its client saw it (times on ``time.monotonic``)."""

    resource: str
    token: int
    lease_id: str
    granted: float  # after the GRANTED answer was read
    releasing: float = 0.0  # before the release was sent


@dataclass
class Results:
    """What every client saw."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


class Board:
    """Per resource: who holds it now (as the clients see it), and the last token written."""

    def __init__(self) -> None:
        self.holder: dict[str, Hold] = {}
        self.last_token: dict[str, int] = {}

    def enter(self, hold: Hold) -> str | None:
        """Write ``hold`` on the board; the violation it finds, if any."""
        problem = None
        current = self.holder.get(hold.resource)
        if current is not None:
            problem = (
                f"double grant on {hold.resource}: {hold.lease_id} (token {hold.token}) "
                f"granted while {current.lease_id} (token {current.token}) is held"
            )
        last = self.last_token.get(hold.resource, -1)
        if hold.token <= last:
            problem = problem or (
                f"fencing token went back on {hold.resource}: {hold.token} after {last}"
            )
        self.holder[hold.resource] = hold
        self.last_token[hold.resource] = max(last, hold.token)
        return problem

    def leave(self, hold: Hold) -> None:
        if self.holder.get(hold.resource) is hold:
            del self.holder[hold.resource]


def _error(
    results: Results, what: str, answer: httpx.Response | None, exc: Any = None, took: float = 0.0
) -> None:
    if len(results.errors) < 20:
        detail = f"{answer.status_code} {answer.text[:300]}" if answer is not None else repr(exc)
        results.errors.append(f"{what} (after {took * 1e3:.0f} ms): {detail}")
    results.outcomes[f"{what} error"] += 1


async def _client(
    n: int,
    key: str,
    base: str,
    resources: list[str],
    wait_s: float,
    hold_s: float,
    stop_at: float,
    board: Board,
    results: Results,
) -> None:
    rng = random.Random(n)
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, limits=limits, timeout=wait_s + 30
    ) as http:
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            resource = rng.choice(resources)
            body = {
                "session_id": f"s{n}",
                "intents": [{"resource": resource, "predicate": "MUTATES"}],
                "ttl_ms": TTL_MS,
                "wait_s": wait_s,
            }
            try:
                await _lease_cycle(http, body, resource, hold_s, board, results)
                await _gate(http, n, i, results)
            except httpx.HTTPError as exc:
                _error(results, "transport", None, exc)


async def _lease_cycle(
    http: httpx.AsyncClient,
    body: dict[str, Any],
    resource: str,
    hold_s: float,
    board: Board,
    results: Results,
) -> None:
    started = time.monotonic()
    answer = await http.post("/v1/leases", json=body)
    got = time.monotonic()
    results.latencies["acquire"].append(got - started)
    if answer.status_code == 409 and answer.json()["error"]["type"] == "lease_timeout":
        results.outcomes["acquire timed out (409 lease_timeout)"] += 1
        return
    if answer.status_code != 200:
        _error(results, "acquire", answer, took=got - started)
        return
    verdict = answer.json()
    if verdict["status"] in ("WAIT", "DIE"):
        results.outcomes[f"acquire {verdict['status']}"] += 1
        return
    if verdict["status"] != "GRANTED" or len(verdict["leases"]) != 1:
        _error(results, "acquire", answer, took=got - started)
        return
    results.outcomes["acquire GRANTED"] += 1
    lease = verdict["leases"][0]
    hold = Hold(resource, int(lease["fencing_token"]), lease["lease_id"], got)
    problem = board.enter(hold)
    if problem is not None:
        results.violations.append(problem)
    if hold_s > 0:
        await asyncio.sleep(hold_s)
    board.leave(hold)
    hold.releasing = time.monotonic()
    results.holds.append(hold)
    answer = await http.post(f"/v1/leases/{hold.lease_id}/release")
    took = time.monotonic() - hold.releasing
    results.latencies["release"].append(took)
    if answer.status_code != 200 or answer.json() != {"released": True}:
        _error(results, "release", answer, took=took)  # released: false = the lease lapsed
    else:
        results.outcomes["release released"] += 1


async def _gate(http: httpx.AsyncClient, n: int, i: int, results: Results) -> None:
    started = time.monotonic()
    answer = await http.post(
        "/v1/gates/execute", json={"action": "bench.step", "metadata": {"client": n, "i": i}}
    )
    took = time.monotonic() - started
    results.latencies["gate"].append(took)
    if answer.status_code != 200 or answer.json()["result"]["status"] != "executed":
        _error(results, "gate", answer, took=took)
    else:
        results.outcomes["gate executed"] += 1


def check_holds(holds: list[Hold]) -> list[str]:
    """Each resource's holds in token order: no repeated token, each ends before the next."""
    problems = []
    by_resource: dict[str, list[Hold]] = defaultdict(list)
    for hold in holds:
        by_resource[hold.resource].append(hold)
    for resource, mine in sorted(by_resource.items()):
        mine.sort(key=lambda h: h.token)
        for before, after in itertools.pairwise(mine):
            if after.token == before.token:
                problems.append(f"token {after.token} granted twice on {resource}")
            elif after.granted < before.releasing:
                problems.append(
                    f"{resource}: token {after.token} was granted "
                    f"{(before.releasing - after.granted) * 1e3:.2f} ms before token "
                    f"{before.token}'s release was sent"
                )
    return problems


# -- the server --------------------------------------------------------------------------
def _prepare(db: Path, clients: int) -> list[str]:
    """The store with one agent key per client; the keys."""
    with Klockwork.open(f"sqlite:///{db}") as kw:
        keys = ApiKeys(kw)
        keys.create("bench-admin", "admin", label="bench_server")
        return [keys.create(f"bench-agent-{n:03d}", "agent")[1] for n in range(clients)]


def _start(db: Path, policies: Path) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable, "-m", "klockwork.cli", "serve", "--url", f"sqlite:///{db}",
        "--host", "127.0.0.1", "--port", "0", "--policies", str(policies),
        "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KLOCKWORK_URL", None)
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=db.parent
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
    if found is None:
        server.kill()
        raise SystemExit(f"the server did not start: {line}{server.stderr.read()[-2000:]}")
    base = found.group(1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/v1/health", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("the server never answered /v1/health")


def _stop(server: subprocess.Popen[str]) -> str:
    server.send_signal(signal.SIGINT)
    try:
        _, err = server.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        _, err = server.communicate()
    return err


# -- the run -----------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _load(args: argparse.Namespace, base: str, keys: list[str]) -> tuple[Results, float]:
    board, results = Board(), Results()
    resources = [f"FILE:/bench/shared-{r}" for r in range(args.resources)]
    started = time.monotonic()
    stop_at = started + args.duration
    await asyncio.gather(
        *(
            _client(
                n, key, base, resources, args.wait_s, args.hold_ms / 1e3, stop_at, board, results
            )
            for n, key in enumerate(keys)
        )
    )
    return results, time.monotonic() - started


def report(args: argparse.Namespace, results: Results, elapsed: float) -> dict[str, Any]:
    """Print the table and the verdicts; the same as a dict (for --json)."""
    results.violations.extend(check_holds(results.holds))
    rows = {}
    print(
        f"klockwork serve over SQLite, loopback: {args.clients} clients, {elapsed:.1f} s, "
        f"{args.resources} shared resources (MUTATES, wait_s {args.wait_s}), gate: allow"
    )
    print(f"{'operation':<10}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    total = 0
    for op in OPERATIONS:
        values = results.latencies.get(op, [])
        total += len(values)
        row = {
            "requests": len(values),
            "per_s": len(values) / elapsed,
            "p50_ms": _percentile(values, 0.50) * 1e3,
            "p99_ms": _percentile(values, 0.99) * 1e3,
        }
        rows[op] = row
        print(
            f"{op:<10}{row['requests']:>10}{row['per_s']:>10.0f}"
            f"{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}"
        )
    print(f"{'all':<10}{total:>10}{total / elapsed:>10.0f}")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(results.outcomes.items())))
    errors = sum(v for k, v in results.outcomes.items() if k.endswith(" error"))
    print(f"errors: {errors}")
    for error in results.errors:
        print(f"  {error}")
    print(f"holds checked: {len(results.holds)}")
    print(f"double grants: {len(results.violations)}")
    for violation in results.violations[:20]:
        print(f"  {violation}")
    safe = errors == 0 and not results.violations and len(results.holds) > 0
    print(f"safety (no error, no double grant): {'PASS' if safe else 'FAIL'}")
    return {
        "clients": args.clients,
        "seconds": elapsed,
        "resources": args.resources,
        "operations": rows,
        "outcomes": dict(results.outcomes),
        "errors": errors,
        "holds": len(results.holds),
        "double_grants": len(results.violations),
        "safe": safe,
    }


def _cpu_of(usage: struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds process ``pid`` used so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Loopback load test of klockwork serve: lease acquire/release and gate "
        "execute by concurrent clients; prints req/s and p50/p99, checks no error and no "
        "double grant. Exits 0 whatever it finds."
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds (default 30)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (50)")
    parser.add_argument("--resources", type=int, default=4, help="shared resources (default 4)")
    parser.add_argument(
        "--wait-s", type=float, default=0.5, help="each acquire's wait_s (default 0.5)"
    )
    parser.add_argument(
        "--hold-ms", type=float, default=1.0, help="how long a client holds a lease (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 clients, 3 s")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 30.0)
    args.clients = args.clients or (10 if args.quick else 50)

    with tempfile.TemporaryDirectory(prefix="kw-bench-server-") as tmp:
        db = Path(tmp) / "kw.db"
        policies = Path(tmp) / "policies.json"
        policies.write_text(
            json.dumps({"policies": [{"name": "bench", "action": "bench.*", "effect": "allow"}]})
        )
        keys = _prepare(db, args.clients)
        print(f"starting klockwork serve over {db} ...", file=sys.stderr)
        server, base = _start(db, policies)
        server_before, own = _proc_cpu(server.pid), _cpu_of(getrusage(RUSAGE_SELF))
        try:
            results, elapsed = asyncio.run(_load(args, base, keys))
            server_cpu = _proc_cpu(server.pid) - server_before
        finally:
            stderr = _stop(server)
        if server.returncode != 0:
            print(f"the server exited {server.returncode}:\n{stderr[-2000:]}", file=sys.stderr)
        out = report(args, results, elapsed)
        client_cpu = _cpu_of(getrusage(RUSAGE_SELF)) - own
        print(
            f"CPU (user+sys) during the load: server {server_cpu:.1f} s, clients "
            f"{client_cpu:.1f} s, over {elapsed:.1f} s on {os.cpu_count()} CPUs"
        )
        out.update(server_cpu_s=server_cpu, client_cpu_s=client_cpu, cpus=os.cpu_count())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
