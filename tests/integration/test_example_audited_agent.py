"""examples/audited_agent.py as a smoke check: run it as a user would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_audited_agent_verifies_its_trail_and_catches_the_forgery() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "audited_agent.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{result.stderr}"
    assert "the trail verifies and the forgery is caught" in out
    assert "the api_token appears in the file: False" in out
    assert '"api_token": "[redacted]"' in out
    for kind in ("chain.start", "llm.end", "tool.start", "tool.end", "chain.end"):
        assert kind in out
    # The CLI's verdicts: exit 0 on the export, exit 1 naming the forged entry's seq.
    assert out.count("-> exit 0") == 1 and out.count("-> exit 1") == 1
    forged = re.search(r"Forged copy: seq (\d+)", out)
    assert forged is not None
    assert re.search(rf"INVALID.*\bseq {forged.group(1)}\b", out)
