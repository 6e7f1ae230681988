"""Peer benchmark: klockwork's gates next to the Agent Governance Toolkit's, in one run.

Both sides decide the same thing: may ``agent-1`` do ``repo.read``, with one
allow policy for that action and everything else denied (each side's
default). Measured in one process, in interleaved batches with
``bench_leases.compare`` (a function call per operation, batches of equal
wall time, the order rotating from one round to the next, the garbage
collector off during a batch); the table prints median and p90 per
operation and the ratio klockwork / peer (below 1: klockwork is faster).

Rows (informational, no target):

* decision only: ``kw.gates.can_i(agent, action)`` (memory engine, one
  allow ``Policy``) against the toolkit's local ``PolicyEvaluator.evaluate``
  (``agent_os.policies``: one ``PolicyDocument`` with one allow rule on
  ``tool_name``, no external backend), which returns a ``PolicyDecision``
  carrying an audit-entry dict but stores nothing;
* decision + audit entry: ``kw.gates.execute(agent, action)`` (no
  ``event_id``; each batch ends with ``kw.audit.flush()`` inside the timing,
  so sealing the batch's entries is charged to it) against a call of the
  toolkit's ``govern()`` wrapper (``agentmesh.governance.govern``: one
  ``Policy`` with one allow rule on ``action.type``; each call evaluates the
  policy, appends an entry to its hash-chained, Merkle-tree ``AuditLog`` in
  memory, then calls the wrapped function, which does nothing).

The peer is optional: the ``bench`` extra (``agent-governance-toolkit-core``
and ``agt-policies``, Python 3.11+) brings it. Without it this prints one
line saying the benchmark is skipped and how to install it, and exits 0. Its
packages warn on import that their old distribution names are deprecated
(they are imported under their documented names); the warning is silenced.
The exit status is 0 in any case: this is a measurement, not a test.

    .venv/bin/python benchmarks/bench_peers.py            # full run (~5 s)
    .venv/bin/python benchmarks/bench_peers.py --quick    # smoke run
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# Timing, results and the table are bench_leases's: one definition for every benchmark.
from bench_leases import (  # noqa: E402
    BATCH_FULL,
    BATCH_QUICK,
    BatchPlan,
    Row,
    compare,
    parse_quick,
    print_header,
    print_table,
)

from klockwork import Klockwork, MemoryStore, Policy  # noqa: E402

AGENT = "agent-1"
ACTION = "repo.read"
PEER_DISTS = ("agent-governance-toolkit-core", "agt-policies")
INSTALL = (
    "uv sync --extra bench (add --extra dev to keep the dev tools) "
    "or pip install 'klockwork[bench]'"
)


FULL, QUICK = BATCH_FULL, BATCH_QUICK


def import_peer() -> dict[str, Any]:
    """The toolkit's classes and functions this benchmark uses (ImportError if absent)."""
    if sys.version_info < (3, 11):
        raise ImportError("the Agent Governance Toolkit needs Python 3.11+")
    with warnings.catch_warnings():
        # agent_os and agentmesh warn on import that their old distributions
        # are deprecated, even when installed from agent-governance-toolkit-core.
        warnings.simplefilter("ignore", DeprecationWarning)
        from agent_os.policies import PolicyDocument, PolicyEvaluator
        from agent_os.policies.schema import (
            PolicyAction,
            PolicyCondition,
            PolicyOperator,
            PolicyRule,
        )
        from agentmesh.governance import govern
        from agentmesh.governance.policy import Policy as MeshPolicy
        from agentmesh.governance.policy import PolicyRule as MeshRule
    return {
        "PolicyDocument": PolicyDocument,
        "PolicyEvaluator": PolicyEvaluator,
        "PolicyAction": PolicyAction,
        "PolicyCondition": PolicyCondition,
        "PolicyOperator": PolicyOperator,
        "PolicyRule": PolicyRule,
        "govern": govern,
        "MeshPolicy": MeshPolicy,
        "MeshRule": MeshRule,
    }


def dist_versions() -> str:
    found = []
    for dist in PEER_DISTS:
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)


def nothing(**kwargs: object) -> None:
    """The function ``govern()`` wraps: does nothing."""


def run(plan: BatchPlan, peer: dict[str, Any]) -> list[Row]:
    # klockwork: memory engine, one allow policy (default effect: deny).
    kw = Klockwork(MemoryStore())
    kw.policies.add(Policy(name="reads", action=ACTION, effect="allow"))
    can_i, execute = kw.gates.can_i, kw.gates.execute

    # The toolkit's local evaluator: one document, one allow rule (default: deny).
    evaluator = peer["PolicyEvaluator"](
        policies=[
            peer["PolicyDocument"](
                name="bench",
                rules=[
                    peer["PolicyRule"](
                        name="reads",
                        condition=peer["PolicyCondition"](
                            field="tool_name", operator=peer["PolicyOperator"].EQ, value=ACTION
                        ),
                        action=peer["PolicyAction"].ALLOW,
                    )
                ],
            )
        ]
    )
    evaluate = evaluator.evaluate
    context = {"tool_name": ACTION, "agent_id": AGENT}

    # The toolkit's govern(): one policy, one allow rule (default_action: deny), audit on.
    governed = peer["govern"](
        nothing,
        policy=peer["MeshPolicy"](
            name="bench",
            rules=[
                peer["MeshRule"](
                    name="reads", condition=f"action.type == '{ACTION}'", action="allow"
                )
            ],
        ),
        agent_id=AGENT,
        audit=True,
    )

    # Both sides allow the action, deny another, and (for the audited calls) record it.
    if can_i(AGENT, ACTION).status != "executed" or can_i(AGENT, "infra.x").status != "denied":
        raise RuntimeError("klockwork: unexpected can_i decisions")  # pragma: no cover
    before = kw.audit.checkpoint().seq
    if execute(AGENT, ACTION).status != "executed":  # pragma: no cover
        raise RuntimeError("klockwork: execute did not allow")
    if kw.audit.checkpoint().seq != before + 1:  # pragma: no cover
        raise RuntimeError("klockwork: execute did not record one audit entry")
    decision = evaluate(context)
    if not decision.allowed or decision.matched_rule != "reads":  # pragma: no cover
        raise RuntimeError(f"PolicyEvaluator: unexpected decision {decision}")
    if evaluate({"tool_name": "infra.x", "agent_id": AGENT}).allowed:  # pragma: no cover
        raise RuntimeError("PolicyEvaluator: another action was allowed")
    governed(action=ACTION)
    audit_log = governed.audit_log
    if audit_log is None or len(audit_log.query(event_type="policy_evaluation")) != 1:
        raise RuntimeError("govern(): the call did not record one audit entry")  # pragma: no cover

    fns: dict[str, Callable[[], object]] = {
        "can_i": lambda: can_i(AGENT, ACTION),
        "evaluate": lambda: evaluate(context),
        "execute": lambda: execute(AGENT, ACTION),
        "govern": lambda: governed(action=ACTION),
    }
    try:
        stats = compare(fns, plan.batches, plan.batch_ms, settle={"execute": kw.audit.flush})
        ours_valid = kw.audit.verify().valid
        peer_valid, _ = audit_log.verify_integrity()
    finally:
        kw.close()
    if not ours_valid or not peer_valid:  # pragma: no cover
        raise RuntimeError(f"audit chains after the run: klockwork {ours_valid}, peer {peer_valid}")
    return [
        Row(
            "decision only: kw.gates.can_i vs AGT PolicyEvaluator.evaluate",
            stats["can_i"],
            stats["evaluate"],
            "agent_os.policies.PolicyEvaluator.evaluate({'tool_name': ..., 'agent_id': ...}), "
            "one PolicyDocument with one allow rule",
            note="memory engine, one allow Policy; neither side records anything",
            section="info",
        ),
        Row(
            "decision + audit entry: kw.gates.execute vs AGT govern() call",
            stats["execute"],
            stats["govern"],
            "agentmesh.governance.govern(fn, policy=<one allow rule>)(action=...): "
            "evaluate, append to its in-memory hash-chained AuditLog, call fn (a no-op)",
            note="execute without event_id; each batch ends with kw.audit.flush(), timed; "
            "both audit chains verified after the run",
            section="info",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    opts = parse_quick(__doc__, argv)
    plan = QUICK if opts.quick else FULL
    try:
        peer = import_peer()
    except ImportError as exc:
        print(
            f"bench_peers: skipped, the Agent Governance Toolkit is not installed ({exc}); "
            f"install the bench extra: {INSTALL}"
        )
        return 0
    print_header(opts.quick, f"memory engine · peer: {dist_versions()}")
    started = time.monotonic()
    rows = run(plan, peer)
    print_table(rows)
    print(f"({time.monotonic() - started:.1f} s)")
    return 0  # a measurement, not a test


if __name__ == "__main__":
    sys.exit(main())
