"""Several hosts, one Redis: agents in three network namespaces coordinate through klockwork.

Issue 13, "Several hosts". Three network namespaces on this machine play
three hosts. Each is joined to the root namespace by a veth pair of its own
on a /30 link the test creates (``10.213.<host>.1`` on the root side,
``.2`` in the namespace; another free ``10.<x>.<host>.0/30`` if 10.213 is
taken); a ``redis-server`` the test starts listens on the root side of each
link (and on 127.0.0.1), so every host reaches it over its own wire.
Agents run as separate processes inside the namespaces (``ip netns exec``)
with the project's interpreter and this checkout on ``PYTHONPATH``.

* 3 hosts x 4 agents x 100 read-modify-write increments of one counter kept
  in Redis (GET, then SET by the agent: not atomic) under a klockwork lease
  on one resource end at exactly 1 200, and the fencing tokens increase
  strictly in the order the lease was granted;
* an approval requested on host 1 (the agent blocks in ``kw.gates.gate``)
  is approved with the CLI on host 2 and resumed on host 3;
* one gapless audit chain with entries from all three hosts.

Needs root and ``ip`` (iproute2): skips with a message otherwise. Only
namespaces, links and addresses the test creates are touched, and all of
them are deleted at teardown, also when the test fails.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis_server import RedisServer, redis_server_available
from support import ROOT

from klockwork import Klockwork
from klockwork.core.governance.approvals import Approval

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not redis_server_available(),
        reason="the several-hosts test starts its own redis-server: install redis-server",
    ),
]

HOSTS = 3
AGENTS_PER_HOST = 4
INCREMENTS = 100
COUNTER_KEY = "hosts-test:counter"  # outside klockwork's namespace, on the test's own server
APPROVER = "alice"
POLICIES = """
from klockwork import Policy
kw.policies.add(Policy(name="deploys-need-ok", action="deploy", effect="require_approval",
                       approvers=["alice"], approval_timeout_s=300))
kw.policies.add(Policy(name="reads-run", action="read", effect="allow"))
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _why_no_namespaces() -> str | None:
    """Why this machine cannot build network namespaces (None when it can)."""
    if shutil.which("ip") is None:
        return "needs `ip` (iproute2) to create network namespaces"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run as root, as CI here does)"
    probe = f"kwprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_second_octet() -> int:
    """A second octet x such that nothing on this machine uses 10.x.0.0/16 (213 preferred)."""
    used = _ip("-4", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
    for x in (213, 214, 215, 216, 217, 218, 219, 220):
        if f" 10.{x}." not in used and f"\n10.{x}." not in "\n" + used:
            return x
    pytest.skip("no free 10.x.0.0/16 among 10.213-10.220 for the test's links")


@dataclass
class Host:
    """One network namespace joined to the root namespace by its own veth link."""

    name: str  # "host1"
    netns: str
    inner_link: str  # its end of the veth pair
    redis_address: str  # the root side of its link, where Redis listens for it
    url: str  # the klockwork store URL as this host reaches it

    def python(
        self, script: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Start ``python -c script args`` inside this host's namespace."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(env),
            cwd=ROOT,
        )

    def run(
        self, argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host's namespace and wait for it."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            capture_output=True,
            text=True,
            env=_env(env),
            cwd=ROOT,
            timeout=timeout_s,
        )


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KLOCKWORK_URL"}
    env["PYTHONPATH"] = str(ROOT)  # `import klockwork` from this checkout
    env.update(extra or {})
    return env


def _finish(proc: subprocess.Popen[str], timeout_s: float) -> Any:
    """Wait for a host's process; its last stdout line is JSON, returned parsed."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout_s}s\n{out[-2000:]}\n{err[-3000:]}"
        ) from None
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


@dataclass
class Network:
    """The three hosts and the Redis they share."""

    hosts: list[Host]
    server: RedisServer
    namespace: str

    def local_url(self) -> str:
        """The store URL from the root namespace (127.0.0.1)."""
        return self.server.url(self.namespace)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """Three namespaces with veth links, a redis-server on the root side of each link."""
    why = _why_no_namespaces()
    if why is not None:
        pytest.skip(f"several-hosts test skipped: {why}")
    tag = uuid.uuid4().hex[:5]
    octet = _free_second_octet()
    netnses: list[str] = []
    links: list[str] = []
    server: RedisServer | None = None
    try:
        addresses = []
        for i in range(1, HOSTS + 1):
            netns, outer, inner = f"kw{tag}h{i}", f"kw{tag}r{i}", f"kw{tag}n{i}"
            _ip("netns", "add", netns)
            netnses.append(netns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", netns)
            links.append(outer)
            _ip("addr", "add", f"10.{octet}.{i}.1/30", "dev", outer)
            _ip("link", "set", outer, "up")
            _ip("-n", netns, "addr", "add", f"10.{octet}.{i}.2/30", "dev", inner)
            _ip("-n", netns, "link", "set", inner, "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            addresses.append(f"10.{octet}.{i}.1")
        server = RedisServer(tmp_path_factory.mktemp("hosts-redis"), aof=True, bind=addresses)
        server.start()
        namespace = f"hosts-{tag}"
        hosts = [
            Host(f"host{i}", netns, f"kw{tag}n{i}", addr, server.url(namespace, host=addr))
            for i, (netns, addr) in enumerate(zip(netnses, addresses, strict=True), start=1)
        ]
        for host in hosts:  # each host reaches Redis over its own link, and only there
            ping = host.run(
                [sys.executable, "-c", f"import redis; print(redis.Redis("
                 f"host={host.redis_address!r}, port={server.port}, socket_timeout=5).ping())"]
            )  # fmt: skip
            assert ping.stdout.strip() == "True", ping.stderr
        yield Network(hosts, server, namespace)
    finally:
        if server is not None:
            server.kill()
        for netns in netnses:  # deleting a namespace deletes its end of the veth pair
            _ip("netns", "del", netns, check=False)
        for link in links:  # and with it the root end; delete it if it survived
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)


# -- 3 x 4 x 100 increments ------------------------------------------------------------------
_INCREMENTER = textwrap.dedent(
    """
    import json, sys, threading
    import redis
    from klockwork import Klockwork

    url, redis_host, port, key, host, agents, n = sys.argv[1:8]
    port, agents, n = int(port), int(agents), int(n)
    seen = []  # (value read, fencing token, agent): one per increment
    errors = []

    def agent(i):
        name = f"{host}-agent{i}"
        try:
            with Klockwork.open(url) as kw:
                counter = redis.Redis(host=redis_host, port=port, socket_timeout=10)
                for _ in range(n):
                    with kw.lease(name, "s", "TABLE:counter", ttl_ms=30_000, timeout_s=120) as held:
                        value = int(counter.get(key) or 0)  # read ...
                        counter.set(key, value + 1)  # ... modify, write: not atomic
                        seen.append((value, held.lease.fencing_token, name))
                counter.close()
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"seen": seen, "errors": errors}))
    """
)


def test_twelve_agents_on_three_hosts_increment_one_counter_exactly(network: Network) -> None:
    """3 hosts x 4 agents x 100 GET/SET increments under one lease -> exactly 1 200.

    Proves: the lease excludes across machines (no increment lost: the
    counter is 1 200, and the 1 200 values read are 0..1 199, each once),
    and fencing tokens increase strictly in grant order (ordered by the
    value each holder read, which is the order they held the lease in).
    """
    server = network.server
    local = redis.Redis(port=server.port)
    local.delete(COUNTER_KEY)
    started = time.monotonic()
    procs = [
        host.python(
            _INCREMENTER,
            host.url,
            host.redis_address,
            str(server.port),
            COUNTER_KEY,
            host.name,
            str(AGENTS_PER_HOST),
            str(INCREMENTS),
        )
        for host in network.hosts
    ]
    results = [_finish(p, timeout_s=100) for p in procs]
    elapsed = time.monotonic() - started
    total = HOSTS * AGENTS_PER_HOST * INCREMENTS
    assert [r["errors"] for r in results] == [[]] * HOSTS
    assert int(local.get(COUNTER_KEY) or 0) == total, f"after {elapsed:.1f}s"
    seen = sorted(tuple(s) for r in results for s in r["seen"])
    assert [s[0] for s in seen] == list(range(total))  # every value read exactly once
    tokens = [s[1] for s in seen]
    assert all(a < b for a, b in itertools.pairwise(tokens)), "tokens not increasing"
    by_host = {h.name: sum(s[2].startswith(h.name + "-") for s in seen) for h in network.hosts}
    assert by_host == {h.name: AGENTS_PER_HOST * INCREMENTS for h in network.hosts}
    with Klockwork.open(network.local_url()) as kw:
        assert kw.leases.list() == []  # every lease released
    local.close()


# -- an approval across hosts ----------------------------------------------------------------
_REQUEST = textwrap.dedent(
    """
    import json, sys
    from klockwork import Klockwork

    url, event_id = sys.argv[1:3]
    with Klockwork.open(url) as kw:
    {policies}
        result = kw.gates.gate("requester", "deploy", {{"env": "prod"}}, event_id=event_id,
                               timeout_s=60)
        print(json.dumps(result.model_dump(mode="json")))
    """
).format(policies=textwrap.indent(POLICIES, "    "))

_RESUME = textwrap.dedent(
    """
    import json, sys
    from klockwork import Klockwork

    url, event_id, approval_id = sys.argv[1:4]
    with Klockwork.open(url) as kw:
    {policies}
        approval = kw.approvals.get(approval_id)
        result = kw.gates.gate("requester", "deploy", {{"env": "prod"}}, event_id=event_id,
                               timeout_s=10)
        print(json.dumps({{"approval": approval.model_dump(mode="json"),
                          "result": result.model_dump(mode="json")}}))
    """
).format(policies=textwrap.indent(POLICIES, "    "))


def test_an_approval_requested_on_one_host_approved_by_the_cli_on_another_resumes_on_a_third(
    network: Network,
) -> None:
    """Host 1 blocks in ``kw.gates.gate``, host 2 approves with the CLI, host 3 resumes.

    Proves: the approval record is shared through Redis across machines: the
    CLI on host 2 (``KLOCKWORK_URL=redis://...`` as its only configuration)
    finds and decides it, the blocked gate on host 1 wakes and is told
    ``executed``, and host 3 sees it approved and, resuming the gate with the
    same event id, is told ``executed`` for the same gate (same audit event
    id, no second approval).
    """
    host1, host2, host3 = network.hosts
    event_id = f"deploy-{uuid.uuid4().hex[:8]}"
    requester = host1.python(_REQUEST, host1.url, event_id)
    with Klockwork.open(network.local_url()) as watcher:
        deadline = time.monotonic() + 30
        pending: list[Approval] = []
        while not pending and time.monotonic() < deadline and requester.poll() is None:
            pending = [a for a in watcher.approvals.list() if a.event_id == event_id]
            time.sleep(0.05)
        if not pending:
            _finish(requester, timeout_s=5)  # shows why the requester stopped
        assert len(pending) == 1, pending
        approval_id = pending[0].approval_id
        assert requester.poll() is None, "the gate returned before anyone approved"

        voted = host2.run(
            [sys.executable, "-m", "klockwork.cli", "approvals", "approve", approval_id,
             "--approver", APPROVER, "--json"],
            env={"KLOCKWORK_URL": host2.url},
        )  # fmt: skip
        assert voted.returncode == 0, voted.stdout + voted.stderr
        assert json.loads(voted.stdout)["status"] == "approved"

        requested = _finish(requester, timeout_s=30)
        assert requested["status"] == "executed", requested
        assert requested["approval_id"] == approval_id

        resumed = _finish(host3.python(_RESUME, host3.url, event_id, approval_id), 30)
        assert resumed["approval"]["status"] == "approved"
        assert [d["approver"] for d in resumed["approval"]["decisions"]] == [APPROVER]
        assert resumed["result"]["status"] == "executed"
        assert resumed["result"]["audit_event_id"] == requested["audit_event_id"]
        assert [a.approval_id for a in watcher.approvals.list(status=None)] == [approval_id]


# -- one audit chain -------------------------------------------------------------------------
_ACT = textwrap.dedent(
    """
    import json, sys
    from klockwork import Klockwork

    url, host = sys.argv[1:3]
    with Klockwork.open(url) as kw:
    {policies}
        kw.gates.execute(f"{{host}}-agent", "read", {{"host": host}})
        with kw.lease(f"{{host}}-agent", "s", f"FILE:/hosts/{{host}}", timeout_s=10):
            pass
        if host == "host3":  # the last host verifies the chain all three wrote
            result = kw.audit.verify()
            # (the namespace is the module's: other tests' entries are on the chain too)
            agents = [f"{{h}}-agent" for h in ("host1", "host2", "host3")
                      if kw.audit.query(agent_id=f"{{h}}-agent").entries]
            print(json.dumps({{"verify": result.model_dump(mode="json"), "agents": agents}}))
        else:
            print(json.dumps({{}}))
    """
).format(policies=textwrap.indent(POLICIES, "    "))


def test_three_hosts_write_one_gapless_audit_chain(network: Network) -> None:
    """Each host gates an action and holds a lease; host 3 then verifies the chain.

    Proves (once it passes): one audit chain for all machines — host 3's
    ``verify()`` is valid, gapless, and covers the entries of agents on all
    three hosts.
    """
    for host in network.hosts:  # one after another: host 3 verifies after the others wrote
        out = _finish(host.python(_ACT, host.url, host.name), 30)
    verify, agents = out["verify"], out["agents"]
    assert verify["valid"], verify
    assert verify["checked"] == verify["head_seq"]
    assert agents == [f"{h.name}-agent" for h in network.hosts], agents


# -- a host cut off while it holds the lease ---------------------------------------------------
_CUT_OFF_HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from klockwork import Klockwork

    url = sys.argv[1]
    out = {}
    kw = Klockwork.open(url)
    try:
        with kw.lease("cut-off", "s", "TABLE:partition", ttl_ms=1500, timeout_s=10) as held:
            lease = held.lease
            print(json.dumps({"lease_id": lease.lease_id, "token": lease.fencing_token}),
                  flush=True)
            deadline = time.monotonic() + 40
            while not held.lost and time.monotonic() < deadline:
                time.sleep(0.05)
            print(json.dumps({"lost": held.lost}), flush=True)
            sys.stdin.readline()  # the test reconnects this host first
        out["exit"] = "none"
    except Exception as exc:
        out["exit"] = type(exc).__name__
    try:
        kw.leases.check_fencing("TABLE:partition", lease.fencing_token)
        out["fence"] = "accepted"
    except Exception as exc:
        out["fence"] = type(exc).__name__
    print(json.dumps(out), flush=True)
    kw.close()
    """
)

_TAKE_OVER = textwrap.dedent(
    """
    import json, sys, time
    from klockwork import Klockwork

    with Klockwork.open(sys.argv[1]) as kw:
        started = time.monotonic()
        verdict = kw.leases.acquire("taker", "s", ("TABLE:partition", "MUTATES"), 30_000,
                                    timeout_s=30)
        lease = verdict.lease
        print(json.dumps({"token": lease.fencing_token, "acquired_at": lease.acquired_at,
                          "waited_s": time.monotonic() - started}))
        kw.leases.release(lease.lease_id)
    """
)


class Lines:
    """The stdout lines of a process, read by a thread (so a test can wait with a timeout)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._queue.put(line)

    def next_json(self, timeout_s: float) -> Any:
        try:
            return json.loads(self._queue.get(timeout=timeout_s))
        except queue.Empty:
            self._proc.kill()
            _, err = self._proc.communicate()
            raise AssertionError(f"no line within {timeout_s}s\n{err[-3000:]}") from None


def test_a_host_cut_off_while_holding_loses_the_lease_and_its_token(network: Network) -> None:
    """Host 1 holds a lease (TTL 1.5 s, auto-renewed); its link goes down; host 2 asks for it.

    Proves, across a real network partition: host 2 is granted the lease
    only once host 1's lease has expired on the server's clock (its grant is
    dated at or after host 1's expiry, and its token is higher); host 1 is
    told it lost the lease (``held.lost``, then LeaseLostError or
    StoreUnavailableError leaving the block) — it never goes on believing it
    holds it; and once reconnected, host 1's old fencing token is refused
    (StaleLeaseError), so a write it had in flight cannot land.
    """
    host1, host2, _ = network.hosts
    link = host1.inner_link
    holder = subprocess.Popen(
        ["ip", "netns", "exec", host1.netns, sys.executable, "-c", _CUT_OFF_HOLDER, host1.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(None),
        cwd=ROOT,
    )
    lines = Lines(holder)
    cut = False
    try:
        held = lines.next_json(30)
        _ip("-n", host1.netns, "link", "set", link, "down")
        cut = True
        taken = _finish(host2.python(_TAKE_OVER, host2.url), timeout_s=40)
        told = lines.next_json(45)
        _ip("-n", host1.netns, "link", "set", link, "up")
        cut = False
        assert holder.stdin is not None
        holder.stdin.write("go on\n")
        holder.stdin.flush()
        final = lines.next_json(30)
        assert holder.wait(30) == 0
    finally:
        if cut:
            _ip("-n", host1.netns, "link", "set", link, "up", check=False)
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with Klockwork.open(network.local_url()) as kw:
        old = kw.leases.get(held["lease_id"])
    assert old is not None and old.state.value == "EXPIRED", old
    assert taken["acquired_at"] >= old.expires_at, (taken, old)
    assert taken["token"] > held["token"]
    assert told == {"lost": True}
    assert final["exit"] in ("LeaseLostError", "StoreUnavailableError"), final
    assert final["fence"] == "StaleLeaseError", final
