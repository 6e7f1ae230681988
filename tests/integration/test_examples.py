"""The runnable examples double as smoke checks: run them as a user would."""

from __future__ import annotations

import os
import re

import pytest
from support import run_example

#: The examples' Redis runs (``make demo-redis``) use the test server when one is set.
REDIS_URL = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")
needs_redis = pytest.mark.skipif(
    not REDIS_URL,
    reason="the Redis demos need a server: KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 "
    "make test (start one with redis-server)",
)


def test_race_two_agents_loses_an_update_then_keeps_both() -> None:
    out = run_example("race_two_agents.py", timeout_s=60)
    assert "lost update: only 1 of 2 edits survived" in out
    assert "both edits survived" in out
    assert "- agent-a was here" in out and "- agent-b was here" in out
    assert "granted" in out and "released" in out


def test_approval_gate_pauses_is_approved_from_another_process_and_resumes() -> None:
    out = run_example("approval_gate.py")
    assert "merged #101" in out and "POLICY_DENIED" in out  # small PR merged, infra/ refused
    assert "paused" in out and "approved by alice (exit 0)" in out
    assert "resumed the graph" in out
    assert "audit chain verified" in out and "The story held." in out


def test_audited_agent_verifies_its_trail_and_catches_the_forgery() -> None:
    out = run_example("audited_agent.py")
    assert "the trail verifies and the forgery is caught" in out
    assert "the api_token appears in the file: False" in out
    assert '"api_token": "[redacted]"' in out
    for kind in ("chain.start", "llm.end", "tool.start", "tool.end", "chain.end"):
        assert kind in out
    # The CLI's verdicts: exit 0 on the export, exit 1 naming the forged entry's sealed block.
    assert out.count("-> exit 0") == 1 and out.count("-> exit 1") == 1
    forged = re.search(
        r"Forged copy: seq (\d+) \(tool.start, sealed in block (\d+)\.\.(\d+)\)", out
    )
    assert forged is not None
    seq, first, last = (int(x) for x in forged.groups())
    assert first <= seq <= last
    assert re.search(rf"INVALID at seq {first}\b", out)


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=needs_redis)])
def test_race_across_processes_loses_an_update_then_keeps_both(store: str) -> None:
    out = run_example("race_processes.py", *(["--url", REDIS_URL] if store == "redis" else []))
    assert f"Store shared by the agent processes: {store}" in out
    assert "lost update: only 1 of 2 edits survived" in out
    assert "both edits survived" in out
    assert "- agent-a was here" in out and "- agent-b was here" in out
    tokens = sorted(int(t) for t in re.findall(r"lease token \[(\d+)\]", out))
    assert tokens == [1, 2]  # one shared engine: the second grant is fenced after the first


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=needs_redis)])
def test_handoff_spreads_tasks_over_two_processes_redelivers_and_dead_letters(store: str) -> None:
    out = run_example("handoff.py", *(["--url", REDIS_URL] if store == "redis" else []))
    assert f"shared by the planner and the worker processes: {store}" in out
    assert "planner: 2 workers ready" in out
    assert re.search(r"worker-\d: t2 attempt 1 failed \(upstream timed out\) -> nack", out)
    assert re.search(r"worker-\d: t2 attempt 2 done -> ack", out)
    assert len(re.findall(r"worker-\d: t3 attempt \d failed .*malformed input", out)) == 2
    assert "result  t2 (flaky) attempt 2: flaky done" in out
    assert "dead    t3 x2: cannot parse task t3: malformed input" in out
    assert "The hand-off held." in out


def test_coding_team_keeps_both_edits_refuses_gates_approves_and_verifies() -> None:
    out = run_example("coding_team.py")
    assert re.search(r"backend +leased FILE:app.py \(fencing token \d\)", out)
    assert re.search(r"frontend +leased FILE:app.py \(fencing token \d\)", out)
    assert "def checkout(): ..." in out and "def render(): ..." in out
    assert "POLICY_DENIED (policy 'no-untested-deploys')" in out
    assert "tries to approve its own deploy: refused" in out
    assert "lead       approves deploy" in out and "deployed to prod" in out
    assert "FAIL" not in out and out.count("  ok   ") == 5
