"""``benchmarks/bench_server.py`` keeps working: a quick loopback run, no error, no double grant.

The run starts a real ``klockwork serve`` over SQLite and drives it with a
few concurrent clients for a few seconds; its own checks (every answer
expected, fencing tokens and holds in order per resource) must pass. The
checkers themselves are shown to catch an overlap they are handed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from support import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_server.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_server", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_server", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_quick_run_has_no_error_and_no_double_grant(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KLOCKWORK_URL", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--clients", "8", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "safety (no error, no double grant): PASS" in done.stdout, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert results["errors"] == 0 and results["double_grants"] == 0, done.stdout
    assert results["holds"] > 0 and results["safe"] is True
    for op in ("acquire", "release", "gate"):
        assert results["operations"][op]["requests"] > 0, done.stdout
    assert results["outcomes"]["gate executed"] == results["operations"]["gate"]["requests"]


def test_the_checks_catch_an_overlap_and_a_token_going_back() -> None:
    bench = _bench()
    first = bench.Hold("FILE:/r", 5, "l1", granted=1.0, releasing=2.0)
    overlapping = bench.Hold("FILE:/r", 6, "l2", granted=1.5, releasing=3.0)
    later = bench.Hold("FILE:/r", 7, "l3", granted=3.1, releasing=4.0)
    elsewhere = bench.Hold("FILE:/s", 1, "l4", granted=1.2, releasing=1.3)
    assert bench.check_holds([first, later, elsewhere]) == []
    problems = bench.check_holds([later, overlapping, first, elsewhere])
    assert len(problems) == 1 and "token 6" in problems[0]
    assert bench.check_holds([first, bench.Hold("FILE:/r", 5, "l9", 9.0, 9.5)]) != []

    board = bench.Board()
    assert board.enter(first) is None
    assert "double grant" in board.enter(overlapping)
    board.leave(overlapping)
    assert "went back" in board.enter(bench.Hold("FILE:/r", 4, "l5", 5.0))


def test_help_names_the_flags_the_docs_use() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    for flag in ("--quick", "--duration", "--clients", "--json"):
        assert flag in done.stdout
