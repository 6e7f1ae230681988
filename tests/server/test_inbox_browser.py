"""A real browser: an approver signs in, edits an agent process's request, approves it.

Headless Chromium (Debian's ``chromium``) driven by Playwright's Python
package, against a real uvicorn server on a loopback port, over a SQLite
store that an agent in another process shares. The agent blocks in
``kw.gates.gate`` until a person decides; the person edits the arguments
in the inbox (the edit needs approval again), approves the edited request,
and the agent goes on with the edited arguments.

The screenshot of the inbox with a pending approval is ``docs/inbox.png``
(shown in the README): written when missing, or again with
``KLOCKWORK_UPDATE_SCREENSHOT=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from klockwork import Klockwork
from klockwork.server import create_app
from server.test_inbox import LiveServer

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install chromium chromium-driver"
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no browser at {CHROMIUM}: the inbox's browser test needs Debian's Chromium ({INSTALL})",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the inbox's browser test needs the playwright package (the dev dependencies)",
)

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "inbox.png"
POLICY = {
    "name": "prod-deploys",
    "action": "deploy.prod",
    "effect": "require_approval",
    "conditions": [{"field": "env", "operator": "eq", "value": "prod"}],
    "approval_timeout_s": 900,
}
ARGUMENTS = {"service": "checkout", "version": "1.2", "env": "prod", "replicas": 3}

# The agent: asks once, waits for a person, follows an edit to its new request.
AGENT = """
import json, sys
from klockwork import GateDeniedError, Klockwork
from klockwork.core.governance.outcomes import gate_key

kw = Klockwork.open(sys.argv[1])
kw.policies.add(json.loads(sys.argv[2]))
args, event = json.loads(sys.argv[3]), "deploy-checkout"
print("ASKING", flush=True)
while True:
    try:
        kw.gates.gate("builder", "deploy.prod", args, event_id=event, timeout_s=120)
    except GateDeniedError:
        answer = kw.gates.ask("builder", "deploy.prod", args, event)
        if answer.replaced_by is None:
            print("DENIED", flush=True)
            sys.exit(1)
        event = answer.replaced_by  # an approver edited it: wait for the edited request
        record = kw.gates.get(gate_key(event))
        args = record.metadata
        continue
    print("RAN " + json.dumps(args, sort_keys=True), flush=True)
    break
kw.close()
"""


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "kw.db")


@pytest.fixture
def engine(store_url: str) -> Iterator[Klockwork]:
    kw = Klockwork.open(store_url)
    kw.policies.add(POLICY)
    yield kw
    kw.close()


def _agent(store_url: str, tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    return subprocess.Popen(
        [sys.executable, str(script), store_url, json.dumps(POLICY), json.dumps(ARGUMENTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_approver_edits_and_approves_in_the_browser_and_the_agent_goes_on(
    engine: Klockwork, store_url: str, tmp_path: Path
) -> None:
    app = create_app(engine)
    _, approver_key = app.state.server.keys.create("bob", "approver", label="browser test")
    _, second_key = app.state.server.keys.create("carol", "approver", label="browser test")
    agent: subprocess.Popen[str] | None = None
    with LiveServer(app) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(30_000)
            problems: list[str] = []  # script errors, CSP violations, failed loads
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(base + "/")
            page.get_by_label("API key").fill(approver_key)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("status").filter(has_text="Signed in as bob").wait_for()
            page.get_by_text("Nothing is waiting").wait_for()
            page.locator("[data-live]:not([hidden])").wait_for()  # the live stream is open

            # The agent asks from its own process; the open page shows it without a reload.
            agent = _agent(store_url, tmp_path)
            card = page.locator("article.card").filter(has_text="deploy.prod")
            card.wait_for()
            sync_api.expect(card).to_contain_text("checkout")
            sync_api.expect(card).to_contain_text("prod-deploys")
            sync_api.expect(card.locator("[data-countdown]")).to_contain_text("min")
            if os.environ.get("KLOCKWORK_UPDATE_SCREENSHOT") or not SCREENSHOT.exists():
                page.reload()  # without the sign-in notice
                page.locator("[data-live]:not([hidden])").wait_for()
                shot = tmp_path / "inbox.png"
                page.screenshot(path=str(shot))
                SCREENSHOT.parent.mkdir(exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT)

            # Edit: version 1.3. The policies judge the edit again: it needs approval again.
            card.get_by_text("Edit the arguments").click()
            card.get_by_label("version").fill("1.3")
            # Another request arrives while the form is being filled: the page says
            # so instead of swapping the list (and the half-filled form) away.
            engine.gates.execute("reviewer", "deploy.prod", {"version": "7", "env": "prod"})
            page.locator("[data-stale]:not([hidden])").wait_for()
            sync_api.expect(card.get_by_label("version")).to_have_value("1.3")
            card.get_by_label("Comment").last.fill("1.2 has the checkout bug; ship 1.3")
            card.get_by_role("button", name="Submit the edit").click()
            page.get_by_text("still needs approval").wait_for()
            edited = page.locator("article.card").filter(has=page.locator("dd", has_text="1.3"))
            edited.wait_for()
            # bob wrote the new arguments: another approver decides them, in her browser.
            edited.get_by_role("button", name="Approve").click()
            page.get_by_text("edited these arguments").wait_for()
            refused = [m for m in problems if "status of 403" in m]
            assert len(refused) == 1  # that refusal, the one failed load expected here
            problems.remove(refused[0])
            other = browser.new_page(viewport={"width": 1280, "height": 800})
            other.on("pageerror", lambda error: problems.append(str(error)))
            other.goto(base + "/")
            other.get_by_label("API key").fill(second_key)
            other.get_by_role("button", name="Sign in").click()
            other.get_by_role("status").filter(has_text="Signed in as carol").wait_for()
            mine = other.locator("article.card").filter(has=other.locator("dd", has_text="1.3"))
            mine.get_by_role("button", name="Approve").click()
            other.get_by_text("You approved deploy.prod").wait_for()

            out, err = agent.communicate(timeout=60)
            assert problems == []
        finally:
            browser.close()
            if agent is not None and agent.poll() is None:
                agent.kill()
                agent.wait()
    assert agent.returncode == 0, err
    ran = [line for line in out.splitlines() if line.startswith("RAN ")]
    assert ran == ["RAN " + json.dumps({**ARGUMENTS, "version": "1.3"}, sort_keys=True)], out
    decided = [a for a in engine.approvals.list(status=None) if a.requester == "builder"]
    assert sorted((a.status.value, a.metadata["version"]) for a in decided) == [
        ("approved", "1.3"),
        ("denied", "1.2"),
    ]
    assert sorted(d.approver for a in decided for d in a.decisions) == ["bob", "carol"]
