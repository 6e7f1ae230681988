"""Helpers shared by several test packages (on the path via pytest's ``pythonpath``)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout_s: float = 120) -> str:
    """Run ``examples/<name> args...`` as a user would; assert it exits 0 and return its stdout."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    out = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{out}\n{result.stderr}"
    return out


def run_spawned(
    target: Callable[..., Any], arg_lists: Sequence[tuple[Any, ...]], timeout_s: float = 90
) -> None:
    """Run ``target(*args, start)`` in one spawned process per ``args``, all at once.

    Every process gets the same ``start`` event as its last argument, set once
    all have started, so they really contend. Asserts that every process
    exited 0; stragglers are killed so a failing test cannot hang the run.
    """
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=target, args=(*args, start)) for args in arg_lists]
    for p in procs:
        p.start()
    try:
        start.set()
        for p in procs:
            p.join(timeout=timeout_s)
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
