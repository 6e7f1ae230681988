"""Every code block in README.md and docs/ runs, so the docs cannot drift from the code.

How each kind of fenced block is checked (the fence's language says which):

* ``python`` — the blocks of one document run in order in one fresh
  interpreter, sharing their names (as a reader pastes them in turn), in an
  empty working directory;
* ``yaml`` — parsed; a ``{"policies": [...]}`` document is validated with
  the policy loader and saved as ``policies.yaml`` for the Python blocks;
* ``bash`` / ``sh`` — run with ``bash -euo pipefail`` in the same directory,
  after the document's Python blocks, against a prepared SQLite store
  (``kw.db`` with pending approvals, ``$APPROVAL_ID`` and ``$APPROVAL_ID_2``
  naming two of them) and an exported trail (``audit.jsonl``, with the
  checkpoint ``head.json``): the placeholders a reader fills in by hand.
  ``klockwork serve`` lines start the server on a free port, wait for it to
  answer ``/v1/health`` and stop it with Ctrl-C; ``make <target>`` lines
  are dry runs (``make -n``: the target exists; the targets themselves are
  what CI runs), a benchmark command is checked
  against its ``--help`` (the script exists and takes those flags), and
  ``--follow`` gets Ctrl-C after two seconds;
* ``text`` — not code (a file tree, a table of output): declared as such.

A block with no language fails: every block must say what it is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from support import ROOT

from klockwork import Klockwork, Policy
from klockwork.core.audit.log import AuditLog
from klockwork.core.governance.policy_files import parse_policies

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHECKED = {"python", "yaml", "bash", "sh", "text"}
_FENCE = re.compile(r"^```(\S*)\s*$")


class Block(NamedTuple):
    path: Path
    line: int  # of the first line of code
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start = i + 1
        i = start
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        out.append(Block(path, start + 1, m.group(1), "\n".join(lines[start:i]) + "\n"))
        i += 1
    return out


ALL = [b for path in DOCS for b in blocks(path)]


def test_the_docs_have_code_and_every_block_says_what_it_is() -> None:
    assert len(DOCS) >= 5 and len(ALL) >= 20
    unknown = [f"{b.where} ({b.lang or 'no language'})" for b in ALL if b.lang not in CHECKED]
    assert unknown == [], "label each fence: python, yaml, bash, sh or text"


# -- running one document -------------------------------------------------------------
_RUN_PYTHON = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
names = {"__name__": "__main__"}
for where, line, code in blocks:
    try:
        exec(compile("\\n" * (line - 1) + code, where.split(":")[0], "exec"), names)
    except BaseException:
        traceback.print_exc()
        print(f"the block at {where} failed", file=sys.stderr)
        sys.exit(1)
"""


#: The server the docs' Redis snippets name; the test runs them on the test server.
_DOC_REDIS = "redis://127.0.0.1:6379/0?namespace="
_TEST_REDIS = os.environ.get("KLOCKWORK_TEST_REDIS_URL", "")


def _on_test_redis(code: str, namespaces: list[str]) -> str:
    """The snippet with its Redis URL pointed at the test server, in a fresh namespace."""
    if _DOC_REDIS not in code:
        return code
    if not _TEST_REDIS:
        pytest.skip(
            "this document's snippets need Redis: "
            "KLOCKWORK_TEST_REDIS_URL=redis://127.0.0.1:6379/15 make test"
        )
    namespace = f"docs-{uuid.uuid4().hex[:12]}"
    namespaces.append(namespace)
    return code.replace(_DOC_REDIS, f"{_TEST_REDIS}?namespace={namespace}-")


def _drop_namespaces(namespaces: list[str]) -> None:
    import redis

    client = redis.Redis.from_url(_TEST_REDIS)
    for namespace in namespaces:
        for key in client.scan_iter(match="{" + namespace + "-*", count=1000):
            client.unlink(key)
    client.close()


def _run_python(doc: list[Block], cwd: Path) -> None:
    namespaces: list[str] = []
    code = [
        (b.where, b.line, _on_test_redis(b.code, namespaces)) for b in doc if b.lang == "python"
    ]
    if not code:
        return
    try:
        _run_blocks(code, cwd)
    finally:
        if namespaces:
            _drop_namespaces(namespaces)


def _run_blocks(code: list[tuple[str, int, str]], cwd: Path) -> None:
    script = cwd / "_blocks.json"
    script.write_text(json.dumps(code))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KLOCKWORK_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", _RUN_PYTHON, str(script)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


def _check_yaml(doc: list[Block], cwd: Path) -> None:
    for block in doc:
        if block.lang != "yaml":
            continue
        data = yaml.safe_load(block.code)
        if isinstance(data, dict) and "policies" in data:
            assert parse_policies(data, block.where)
            (cwd / "policies.yaml").write_text(block.code)


def _prepare_store(cwd: Path) -> dict[str, str]:
    """What a reader of the shell blocks has: a shared store, an export, ids to paste."""
    with Klockwork.open(f"sqlite:///{cwd / 'kw.db'}") as kw:
        kw.policies.add(Policy(name="ask", action="pr.merge", effect="require_approval"))
        first = kw.gates.execute("merger", "pr.merge", {"pr": {"files": 73}}).approval_id
        second = kw.gates.execute("merger", "pr.merge", {"pr": {"files": 80}}).approval_id
        kw.leases.acquire("writer", "s1", ("FILE:/src/auth.ts", "MUTATES"), 600_000)
    if not (cwd / "audit.jsonl").exists():  # unless the document's Python wrote its own
        log = AuditLog()
        for i in range(3):
            log.record("action.executed", "merger", "s1", {"pr": i})
        log.export(cwd / "audit.jsonl")
        (cwd / "head.json").write_text(log.checkpoint().model_dump_json())
        log.close()
    assert first and second
    return {"APPROVAL_ID": first, "APPROVAL_ID_2": second}


_PRELUDE = """
__kw_make() { make -n -C "$KW_ROOT" "$@" >/dev/null; }
# `klockwork serve ...` runs until stopped: start it on a free port, wait
# until it answers /v1/health, then stop it with Ctrl-C (it must exit 0).
__kw_serve() {
  local port; port=$("$KW_PYTHON" -c 'import socket; s = socket.socket()
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  klockwork serve "$@" --port "$port" 2>serve.err &
  local pid=$!
  "$KW_PYTHON" -c '
import sys, time, urllib.request
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/health", timeout=1).read()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("klockwork serve did not answer /v1/health")' "$port" ||
    { kill "$pid"; cat serve.err >&2; return 1; }
  kill -INT "$pid"; wait "$pid"
}
__kw_bench() {
  local script=$1; shift
  local help; help=$("$KW_PYTHON" "$KW_ROOT/$script" --help)
  for flag in "$@"; do
    case $flag in --*) grep -q -- "${flag%%=*}" <<<"$help" || {
      echo "$script takes no $flag" >&2; return 1; };; esac
  done
}
"""


def _shell_line(line: str) -> str:
    words = line.split("#", 1)[0].split()
    if not words:
        return line
    if words[0] == "make":
        return "__kw_make " + " ".join(words[1:])
    if words[0].endswith("python") and len(words) > 1 and words[1].startswith("benchmarks/"):
        return "__kw_bench " + " ".join(shlex.quote(w) for w in words[1:])
    if words[:2] == ["klockwork", "serve"]:
        return "__kw_serve " + " ".join(shlex.quote(w) for w in words[2:] if w != "&")
    if words[0] == "klockwork" and ("--follow" in words or "-f" in words):
        return "timeout --preserve-status -s INT 2 " + line
    return line


def _run_shell(doc: list[Block], cwd: Path) -> None:
    shell = [b for b in doc if b.lang in ("bash", "sh")]
    if not shell:
        return
    env = {**os.environ, **_prepare_store(cwd)}
    env.pop("KLOCKWORK_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(KW_ROOT=str(ROOT), KW_PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    for block in shell:
        script = _PRELUDE + "\n".join(_shell_line(x) for x in block.code.splitlines())
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{block.where}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_block_of_the_document_runs(path: Path, tmp_path: Path) -> None:
    doc = blocks(path)
    _check_yaml(doc, tmp_path)
    _run_python(doc, tmp_path)
    _run_shell(doc, tmp_path)
