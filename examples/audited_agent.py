"""An agent's run in a tamper-evident audit trail, verified offline, and a forgery caught.

A ``create_agent`` agent named ``billing-agent`` (a fake chat model, so it
runs offline) calls a ``send_invoice`` tool. One line turns auditing on::

    config={"callbacks": [AuditCallbackHandler(kw, redact={"api_token"})]}

Every graph step, model answer and tool call becomes a hash-chained entry of
``kw.audit``, with the agent's identity (from ``create_agent(name=...)``),
the LangGraph node and run ids; the ``api_token`` argument is stored as
``[redacted]``. The trail is exported to a JSON Lines file and checked with
the command line, as an auditor would::

    klockwork audit verify audit.jsonl            # exit 0: valid

Then a copy is "edited" — the invoiced amount changed after the fact, the
line's hash left as it was — and the same command catches it (exit 1) and
names the sealed block that holds the entry: the log seals entries in
blocks, one hash per block, so an edit breaks its block's seal.

    .venv/bin/python examples/audited_agent.py

Exit code 0 when the original verifies and the forgery is caught (a smoke check).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from klockwork import Klockwork
from klockwork.integrations.langchain import AuditCallbackHandler

kw = Klockwork()  # in-memory engine; its audit trail is on by default


@tool
def send_invoice(customer: str, amount_eur: int, api_token: str) -> str:
    """Send an invoice to a customer."""
    return f"invoice INV-7 sent to {customer}: {amount_eur} EUR"


class ScriptedModel(GenericFakeChatModel):
    """A fake chat model that replays its script; binding tools changes nothing."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def run_agent() -> str:
    call = {
        "name": "send_invoice",
        "args": {"customer": "ACME", "amount_eur": 120, "api_token": "sk-live-51HxQ"},
        "id": "call-1",
    }
    usage = {"input_tokens": 42, "output_tokens": 9, "total_tokens": 51}
    model = ScriptedModel(
        messages=iter([AIMessage("", tool_calls=[call]), AIMessage("Sent.", usage_metadata=usage)])
    )
    agent = create_agent(model, [send_invoice], name="billing-agent")
    handler = AuditCallbackHandler(kw, redact={"api_token"})
    result = agent.invoke(
        {"messages": [("user", "Invoice ACME 120 EUR.")]}, config={"callbacks": [handler]}
    )
    return str(result["messages"][-1].content)


def describe(entry: Any) -> str:
    data = entry.data
    what = data.get("tool") or data.get("name") or data.get("model") or ""
    if entry.kind == "tool.start":
        what += f" {json.dumps(data['inputs'])}"
    elif entry.kind == "llm.end" and "usage" in data:
        what += f" ({data['usage']['total_tokens']} tokens)"
    node = data.get("langgraph_node") or "-"
    return f"  seq {entry.seq:>2}  {entry.kind:<12} {entry.agent_id:<14} {node:<6} {what}"


def verify(path: Path, tmp: str) -> int:
    """Run ``klockwork audit verify FILE`` as a user would; print what it says."""
    print(f"$ klockwork audit verify {str(path).replace(tmp, '$TMP')}")
    cli = [sys.executable, "-m", "klockwork.cli", "audit", "verify", str(path)]
    done = subprocess.run(cli, capture_output=True, text=True, check=False)
    for line in (done.stdout + done.stderr).strip().splitlines():
        print(f"  {line.replace(tmp, '$TMP')}")
    print(f"  -> exit {done.returncode}")
    return done.returncode


def forge(source: Path, target: Path) -> tuple[int, int, int]:
    """Copy the trail, raising the invoiced amount in the tool call.

    Returns the seq edited and the first and last seq of its sealed block.
    """
    lines = source.read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    for i, entry in enumerate(entries):
        if entry["kind"] == "tool.start":
            block = [e["seq"] for e in entries if e["hash"] == entry["hash"]]
            entry["data"]["inputs"]["amount_eur"] = 12_000  # hash left as it was
            lines[i] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
            target.write_text("\n".join(lines) + "\n", encoding="utf-8")
            return int(entry["seq"]), min(block), max(block)
    raise RuntimeError("no tool.start entry to forge")


def main() -> int:
    print("Run: billing-agent invoices ACME (fake chat model, offline)")
    print(f"  agent: {run_agent()!r}\n")

    entries = kw.audit.query(limit=1000).entries
    print(f"Audit trail ({len(entries)} entries: seq, kind, agent, node, what):")
    for entry in entries:
        print(describe(entry))
    print()

    with tempfile.TemporaryDirectory(prefix="klockwork-audit-") as tmp:
        original, forged = Path(tmp) / "audit.jsonl", Path(tmp) / "forged.jsonl"
        kw.audit.export(original)
        leaked = "sk-live-51HxQ" in original.read_text(encoding="utf-8")
        print(f"Exported {len(entries)} entries; the api_token appears in the file: {leaked}")
        valid = verify(original, tmp) == 0
        print()

        seq, first, last = forge(original, forged)
        print(
            f"Forged copy: seq {seq} (tool.start, sealed in block {first}..{last}) "
            "amount_eur 120 -> 12000, hash untouched"
        )
        caught = verify(forged, tmp) == 1
    kw.close()
    ok = valid and caught and not leaked
    print("\n-> the trail verifies and the forgery is caught" if ok else "\n-> UNEXPECTED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
