"""The committed OpenAPI schema (docs/openapi.json) is the running app's."""

from __future__ import annotations

import json
import subprocess
import sys

from fastapi import FastAPI
from support import ROOT

from klockwork.server.openapi import REGENERATE, render, schema

COMMITTED = ROOT / "docs" / "openapi.json"


def _differences(committed: dict[str, object], running: dict[str, object]) -> list[str]:
    """What a reader needs to find the change: the paths and schemas that differ."""
    out = []
    for section in ("paths", "components"):
        old, new = committed.get(section, {}), running.get(section, {})
        assert isinstance(old, dict) and isinstance(new, dict)
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                state = "added" if name not in old else "removed" if name not in new else "changed"
                out.append(f"{section} {name}: {state}")
    return out or ["(elsewhere: info, tags...)"]


def test_the_committed_schema_is_the_running_apps(app: FastAPI) -> None:
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    running = app.openapi()
    assert committed == running, (
        "docs/openapi.json is out of date; regenerate it from the project's root with\n"
        f"    {REGENERATE}\n"
        "and commit it. Differences: " + "; ".join(_differences(committed, running))
    )


def test_the_committed_file_is_written_the_way_the_module_writes_it() -> None:
    text = COMMITTED.read_text(encoding="utf-8")
    assert text == render(json.loads(text)), f"reformat it: {REGENERATE}"
    assert render(schema()) == render(schema())  # stable from one run to the next


def test_the_module_prints_the_schema() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "klockwork.server.openapi"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    assert printed.decode("utf-8") == render(schema())
    assert printed.endswith(b"}\n")
