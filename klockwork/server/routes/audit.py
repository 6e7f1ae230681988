"""The audit trail over HTTP: query, verify, export, checkpoint (approvers and admins).

``GET /v1/audit/export`` streams the stored lines of the chain as JSON
Lines, the very bytes ``kw.audit.export(path)`` writes: saved to a file,
``klockwork audit verify FILE`` checks them offline, so nobody has to
trust the server that served them. A checkpoint (``POST
/v1/audit/checkpoint``) taken earlier and kept elsewhere catches a chain
cut short since (``POST /v1/audit/verify`` with it as the body).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain, islice

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from klockwork.core.audit.chain import AUDIT_KINDS, Checkpoint, VerifyResult
from klockwork.core.audit.paging import MAX_QUERY_LIMIT, AuditPage
from klockwork.core.validation import INT64_MAX, MAX_KEY_CHARS
from klockwork.server.context import Server
from klockwork.server.errors import COMMON_REFUSALS, refusals
from klockwork.server.keys import ApiKey

__all__ = ["CheckpointBody", "router"]

#: Lines per chunk of an export: one write per chunk instead of one per entry.
_EXPORT_CHUNK = 512
_HASH = r"^[0-9a-f]{64}$"


class CheckpointBody(BaseModel):
    """A checkpoint to verify against, as ``POST /v1/audit/checkpoint`` returned it."""

    seq: int = Field(strict=True, ge=0, le=INT64_MAX)
    hash: str = Field(pattern=_HASH)
    ts: int = Field(strict=True, ge=0, le=INT64_MAX)
    signature: str | None = Field(default=None, pattern=_HASH)

    def checkpoint(self) -> Checkpoint:
        """The engine's :class:`Checkpoint` with these fields."""
        return Checkpoint(seq=self.seq, hash=self.hash, ts=self.ts, signature=self.signature)


def _chunks(first: bytes | None, rest: Iterator[bytes]) -> Iterator[bytes]:
    """The export's lines, newline-terminated, a few hundred per chunk."""
    lines = rest if first is None else chain((first,), rest)
    while batch := list(islice(lines, _EXPORT_CHUNK)):
        batch.append(b"")
        yield b"\n".join(batch)


def router(server: Server) -> APIRouter:
    """``/v1/audit``: query, verify, export, checkpoint."""
    api = APIRouter(
        prefix="/v1/audit",
        tags=["audit"],
        responses=refusals(*COMMON_REFUSALS),
    )
    audit = server.kw.audit
    reader = Depends(server.gatekeeper.require("approver", "admin"))

    @api.get("")
    def query_audit(
        _: ApiKey = reader,
        kind: str | None = Query(
            default=None,
            description="only entries of this kind",
            json_schema_extra={"enum": sorted(AUDIT_KINDS)},
        ),
        agent_id: str | None = Query(default=None, min_length=1, max_length=MAX_KEY_CHARS),
        session_id: str | None = Query(default=None, min_length=1, max_length=MAX_KEY_CHARS),
        since: int | None = Query(
            default=None, ge=-INT64_MAX, le=INT64_MAX, description="only ts >= since (epoch ms)"
        ),
        cursor: str | None = Query(
            default=None, min_length=1, max_length=64, description="next_cursor of the last page"
        ),
        limit: int = Query(default=100, ge=1, le=MAX_QUERY_LIMIT),
    ) -> AuditPage:
        """Entries matching every filter given, oldest first, a page at a time.

        A page that is not the last carries ``next_cursor``: pass it as
        ``cursor`` (with the same filters) for the next one.
        """
        return audit.query(
            kind=kind,
            agent_id=agent_id,
            session_id=session_id,
            since=since,
            cursor=cursor,
            limit=limit,
        )

    @api.get("/verify")
    def verify_audit(_: ApiKey = reader) -> VerifyResult:
        """Verify the whole stored chain: ``valid``, or the first broken seq and why."""
        return audit.verify()

    @api.post("/verify")
    def verify_audit_against(body: CheckpointBody, _: ApiKey = reader) -> VerifyResult:
        """Verify the chain against a checkpoint taken earlier: also catches truncation.

        With an audit key configured, the checkpoint's signature must verify.
        """
        return audit.verify(against=body.checkpoint())

    @api.post("/checkpoint")
    def checkpoint_audit(_: ApiKey = reader) -> Checkpoint:
        """The chain's head now (signed when the engine has an audit key): keep it elsewhere."""
        return audit.checkpoint()

    @api.get(
        "/export",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "The chain as JSON Lines, one entry per line.",
                "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            }
        },
    )
    def export_audit(_: ApiKey = reader) -> StreamingResponse:
        """The whole chain as JSON Lines: the bytes ``klockwork audit verify FILE`` checks.

        A store that cannot answer is a 503 before anything is sent.
        """
        lines = audit.iter_lines()
        # Read the first line here (the endpoint runs in a worker thread) so a
        # store that fails is an error status, not a 200 cut short.
        first = next(lines, None)
        return StreamingResponse(
            _chunks(first, lines),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": 'attachment; filename="audit.jsonl"'},
        )

    return api
