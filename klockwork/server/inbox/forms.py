"""The inbox's forms (POST): sign in and out, approve / reject / edit, verify the audit trail.

Every form carries a CSRF token (:mod:`.session`); one without it, or with
another session's, is refused 403 and audited (``access.denied``, reason
``csrf``). A decision is made as the signed-in person, whatever the form
says: no field names who decides. The rules are the API's
(:mod:`klockwork.server.decisions`). Each form answers with a redirect
(303) to a page that shows what happened, so reloading never repeats it;
a refusal answers its page with the status (403, 409, 422...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from klockwork.core.governance.outcomes import GateAnswer
from klockwork.server.auth import client_of
from klockwork.server.decisions import Edited
from klockwork.server.errors import ApiError
from klockwork.server.inbox.base import Inbox
from klockwork.server.inbox.pages import signin_page
from klockwork.server.inbox.render import compact
from klockwork.server.inbox.session import PEOPLE
from klockwork.server.inbox.views import ArgumentField, fields_of
from klockwork.server.keys import ApiKey

__all__ = ["add_forms", "edited_arguments"]

_COMMENT_MAX = 4000
_KEY_MAX = 200


async def form_of(request: Request) -> dict[str, str]:
    """The posted form's text fields (the first value of each name)."""
    fields: dict[str, str] = {}
    for name, value in (await request.form()).multi_items():
        if isinstance(value, str):
            fields.setdefault(name, value)
    return fields


Form = Depends(form_of)


def _invalid(argument: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", message, argument)


def _plain_value(field: ArgumentField, raw: str) -> Any:
    """The value of a plain argument's input, of the argument's own type."""
    if field.kind == "text":
        return raw
    if field.kind == "bool":
        if raw not in ("true", "false"):
            raise _invalid(field.name, f"{field.name}: choose true or false")
        return raw == "true"
    text = raw.strip()
    if field.kind == "null":
        if not text:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return raw  # a word typed where nothing was: text
    whole = isinstance(field.value, int)
    try:
        number = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise _invalid(field.name, f"{field.name}: {raw!r} is not {kind}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise _invalid(field.name, f"{field.name}: {raw!r} is not a finite number")
    return number


def edited_arguments(metadata: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
    """The arguments an edit form asks for: its inputs, typed as the originals, and its JSON.

    A plain argument whose input is missing keeps its value. The ``nested``
    text area holds a JSON object: the nested arguments as edited (and any
    argument to add); emptied, the nested arguments are dropped.

    Raises:
        ApiError: 422 for an input of the wrong type or JSON that is not an object.
    """
    plain, nested = fields_of(metadata)
    edited: dict[str, Any] = {}
    for field in plain:
        raw = form.get(f"arg.{field.name}")
        edited[field.name] = field.value if raw is None else _plain_value(field, raw)
    text = form.get("nested")
    if text is None:
        edited.update(nested)
    elif text.strip():
        try:
            more = json.loads(text)
        except ValueError as exc:
            raise _invalid("nested", f"the nested arguments are not JSON: {exc}") from None
        except RecursionError:
            raise _invalid("nested", "the nested arguments are nested too deeply") from None
        if not isinstance(more, dict):
            raise _invalid("nested", "the nested arguments must be a JSON object {...}")
        if any(len(name) > _KEY_MAX for name in more):
            raise _invalid("nested", f"an argument name is longer than {_KEY_MAX}")
        edited.update(more)
    return edited


def _comment(form: dict[str, str]) -> str:
    comment = form.get("comment", "").strip()
    if len(comment) > _COMMENT_MAX:
        raise _invalid("comment", f"the comment is longer than {_COMMENT_MAX} characters")
    return comment


def _edit_notice(edited: Edited) -> tuple[str, str]:
    """What an edit led to, for the next page: (level, text)."""
    answer: GateAnswer = edited.answer
    result = answer.result
    what = f"{answer.action} {compact(edited.replaced.metadata)} was replaced by your edit"
    if answer.approval is not None and result.status == "requested":
        return "ok", (
            f"{what}. The edited action {compact(answer.approval.metadata)} was judged "
            f"again and still needs approval: it is waiting below "
            f"({answer.approval.approval_id})."
        )
    if result.status == "denied":
        return "error", f"{what}. The policies refused the edited action: {answer.refusal}"
    return "ok", f"{what}. The policies allow the edited action: the agent runs it now."


def add_forms(api: APIRouter, inbox: Inbox) -> None:
    """Add the forms' POST routes to ``api``."""
    server = inbox.server
    sessions = inbox.sessions
    decisions = inbox.decisions
    gatekeeper = server.gatekeeper

    def done(to: str, level: str, text: str) -> Response:
        response = RedirectResponse(to, status_code=303)
        sessions.notify(response, level, text)
        return response

    def signed_form(
        request: Request, form: dict[str, str], work: Callable[[ApiKey], Response]
    ) -> Response:
        """``work`` as the signed-in person, once the form's token is checked."""
        key = inbox.signed_in(request)
        if key is None:
            # Audited as any key-less request: bounded per address.
            gatekeeper.refuse_keyless(request, client_of(request))
            refused = ApiError(401, "unauthenticated", "you are signed out: sign in again")
            return inbox.renderer.error(request, refused, None)

        def checked() -> Response:
            sessions.check_csrf(request, form.get("csrf", ""), key)
            return work(key)

        return inbox.answer(request, key, checked)

    @api.post("/signin")
    def signin(request: Request, form: dict[str, str] = Form) -> Response:
        """Exchange an approver's (or admin's) API key for a session cookie."""
        client = client_of(request)
        try:
            sessions.check_signin_token(request, form.get("csrf", ""))
        except ApiError as exc:
            # Not counted as a failed sign-in: any web page can post this form
            # without the token, and must not lock out the address's keys.
            return signin_page(inbox, request, exc.status, exc.detail.message)
        presented = form.get("api_key", "").strip()
        key = server.keys.authenticate(presented) if presented else None
        # As for the API: a right key signs in even while the address is
        # blocked; a wrong one is then answered 429 (and not audited again).
        wait = gatekeeper.limiter.blocked_for(client) if key is None else 0.0
        if wait > 0:
            retry = int(wait) + 1
            response = signin_page(
                inbox,
                request,
                429,
                f"Too many failed sign-ins from {client}: try again in {retry} s.",
            )
            response.headers["Retry-After"] = str(retry)
            return response
        if key is None:
            limited = gatekeeper.limiter.failed(client) >= gatekeeper.limiter.max_failures
            gatekeeper.refuse(
                request,
                401,
                "unauthenticated",
                "unknown or revoked API key",
                rate_limited=limited,
                via="inbox",
            )
            return signin_page(inbox, request, 401, "That key is unknown or revoked.")
        if key.role not in PEOPLE:
            gatekeeper.refuse(
                request,
                403,
                "forbidden",
                "an agent key cannot sign in to the inbox",
                key,
                via="inbox",
            )
            return signin_page(
                inbox,
                request,
                403,
                "That is an agent's key: agents use the API. Sign in with an approver's key.",
            )
        response = done("/", "ok", f"Signed in as {key.principal} ({key.role}).")
        sessions.start(response, key)
        return response

    @api.post("/signout")
    def signout(request: Request, form: dict[str, str] = Form) -> Response:
        """End the session (this cookie stops working here at once)."""

        def work(key: ApiKey) -> Response:
            response = done("/", "ok", f"Signed out {key.principal}.")
            sessions.end(request, response)
            return response

        return signed_form(request, form, work)

    @api.post("/approvals/{approval_id}/vote")
    def vote(approval_id: str, request: Request, form: dict[str, str] = Form) -> Response:
        """Approve or reject (``verdict``) with a comment, as the signed-in person."""

        def work(key: ApiKey) -> Response:
            verdict = form.get("verdict", "")
            if verdict not in ("approve", "deny"):
                raise _invalid("verdict", "choose approve or reject")
            approval = decisions.vote(request, approval_id, key, verdict, _comment(form))
            said = "approved" if verdict == "approve" else "rejected"
            tally = sum(d.verdict == "approve" for d in approval.decisions)
            state = (
                f"it waits for more approvals ({tally} of {approval.quorum})"
                if approval.status.value == "pending"
                else f"it is now {approval.status.value}"
            )
            text = f"You {said} {approval.action} ({approval.approval_id}): {state}."
            return done("/", "ok", text)

        return signed_form(request, form, work)

    @api.post("/approvals/{approval_id}/edit")
    def edit(approval_id: str, request: Request, form: dict[str, str] = Form) -> Response:
        """Replace the arguments, as the signed-in person; the policies judge the edit again."""

        def work(key: ApiKey) -> Response:
            approval = decisions.fetch(request, approval_id, key)
            arguments = edited_arguments(approval.metadata, form)
            if arguments == approval.metadata:
                raise _invalid("arguments", "nothing was changed: approve or reject it instead")
            edited = decisions.edit(request, approval_id, key, arguments, _comment(form))
            return done("/", *_edit_notice(edited))

        return signed_form(request, form, work)

    @api.post("/audit/verify")
    def verify(request: Request, form: dict[str, str] = Form) -> Response:
        """Verify the whole audit chain and say what was found."""

        def work(key: ApiKey) -> Response:
            result = server.kw.audit.verify()
            if result.valid:
                return done("/audit", "ok", f"The audit trail verifies: {result.reason}.")
            return done("/audit", "error", f"The audit trail does NOT verify: {result.reason}.")

        return signed_form(request, form, work)
