"""The runnable examples double as smoke checks: run them as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_race_two_agents_loses_an_update_then_keeps_both() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "race_two_agents.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{result.stderr}"
    assert "lost update: only 1 of 2 edits survived" in out
    assert "both edits survived" in out
    assert "- agent-a was here" in out and "- agent-b was here" in out
    assert "granted" in out and "released" in out


def test_approval_gate_pauses_is_approved_from_another_process_and_resumes() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "approval_gate.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{result.stderr}"
    assert "POLICY_DENIED" in out  # the infra/ PR
    assert "paused" in out and "approved by alice (exit 0)" in out
    assert "resumed the graph" in out
    assert "audit chain verified" in out and "The story held." in out
