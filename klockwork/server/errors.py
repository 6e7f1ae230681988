"""Every refusal of the API as one JSON shape, with the status a client can act on.

``{"error": {"type": ..., "message": ..., "argument": ...}}``: ``type`` is
stable (a client branches on it), ``message`` is for people, ``argument``
names the offending input when there is one. The engine's typed errors map
one to one; nothing the engine raises on purpose becomes a 500.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from klockwork.core.errors import (
    ApprovalNotFoundError,
    ApprovalTimeoutError,
    CapabilityError,
    InvalidRequestError,
    KlockworkError,
    LeaseExpiredError,
    LeaseNotFoundError,
    LeaseRevokedError,
    LeaseTimeoutError,
    NotAnApproverError,
    StoreUnavailableError,
)
from klockwork.core.governance.approvals import ApprovalClosedError

__all__ = [
    "MAX_BODY_BYTES",
    "ApiError",
    "BodyLimit",
    "ErrorBody",
    "ErrorDetail",
    "install_handlers",
]

#: The largest request body read (a bus payload is at most 1 MiB of JSON).
MAX_BODY_BYTES = 8 << 20


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``type``, a sentence, and the argument at fault."""

    type: str
    message: str
    argument: str | None = None


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer of the API."""

    error: ErrorDetail


#: What any authenticated route may answer: no key, a wrong role, bad input,
#: too many failed sign-ins, a store that cannot answer.
COMMON_REFUSALS = (401, 403, 422, 429, 503)


def refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of refusals with these status codes (all an :class:`ErrorBody`)."""
    return {code: {"model": ErrorBody} for code in codes}


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate from the input (``"\\udfff"``) is
    spelled out, so that the answer naming it can be sent at all."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ApiError(Exception):
    """A refusal raised by a route: ``status`` and the :class:`ErrorDetail` fields."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        argument: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.detail = ErrorDetail(
            type=type,
            message=_printable(message),
            argument=None if argument is None else _printable(argument),
        )
        self.headers = headers
        super().__init__(message)


#: The engine's errors, most specific first: (class, status, type).
_MAPPING: tuple[tuple[type[Exception], int, str], ...] = (
    (ApprovalClosedError, 409, "approval_closed"),
    (InvalidRequestError, 422, "invalid_request"),
    (StoreUnavailableError, 503, "store_unavailable"),
    (NotAnApproverError, 403, "not_an_approver"),
    (CapabilityError, 403, "capability"),
    (ApprovalNotFoundError, 404, "approval_not_found"),
    (ApprovalTimeoutError, 408, "approval_timeout"),
    (LeaseNotFoundError, 404, "lease_not_found"),
    (LeaseExpiredError, 410, "lease_expired"),
    (LeaseRevokedError, 410, "lease_revoked"),
    (LeaseTimeoutError, 409, "lease_timeout"),
    (KlockworkError, 409, "refused"),
)


def _answer(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> Any:
    body = ErrorBody(error=detail).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=headers)


def engine_error(exc: Exception) -> ApiError:
    """The :class:`ApiError` an engine error stands for."""
    for cls, status, kind in _MAPPING:
        if isinstance(exc, cls):
            argument = exc.argument if isinstance(exc, InvalidRequestError) else None
            return ApiError(status, kind, str(exc), argument)
    return ApiError(500, "internal", "internal error")  # pragma: no cover - not an engine error


class BodyLimit:
    """Refuse a request body over ``max_bytes`` (413) before it is read into memory.

    FastAPI reads a body before the route's dependencies run, so without
    this anyone, with no key, could make the server hold any size of body.
    A declared ``Content-Length`` over the limit is answered at once; a
    chunked body is cut off once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"the body is larger than {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                detail = ErrorDetail(type="too_large", message=self._too_large().detail)
                await _answer(413, detail, {"Connection": "close"})(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._too_large()  # FastAPI lets an HTTPException through
            return message

        await self.app(scope, counted, send)


def install_handlers(app: FastAPI) -> None:
    """Answer every refusal with an :class:`ErrorBody`; refuse a body over ``MAX_BODY_BYTES``."""

    async def api_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, ApiError)
        return _answer(exc.status, exc.detail, exc.headers)

    async def klockwork_error(request: Request, exc: Exception) -> Any:
        error = engine_error(exc)
        return _answer(error.status, error.detail)

    async def validation_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        argument = ".".join(where) or None
        message = first.get("msg", "invalid request")
        if argument:
            message = f"invalid {argument}: {message}"
        return _answer(422, ErrorDetail(type="invalid_request", message=message, argument=argument))

    async def http_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # a body FastAPI could not parse (not JSON, not UTF-8)
            detail = ErrorDetail(type="invalid_request", message=str(exc.detail), argument="body")
            return _answer(422, detail)
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        kind = kinds.get(exc.status_code, "http")
        return _answer(
            exc.status_code,
            ErrorDetail(type=kind, message=str(exc.detail)),
            dict(exc.headers or {}),
        )

    async def internal_error(request: Request, exc: Exception) -> Any:
        # A bug, not a refusal: the error shape, and nothing of the exception.
        return _answer(500, ErrorDetail(type="internal", message="internal error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(KlockworkError, klockwork_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(BodyLimit)
