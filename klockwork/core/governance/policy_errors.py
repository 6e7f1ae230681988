"""Turning pydantic's validation errors on policies into one clear, typed error.

A bad policy (in code or in a file) is reported as an
:class:`~klockwork.InvalidRequestError` naming the field, what is wrong with
it and the value given, and suggesting the field a typo meant.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from klockwork.core.errors import InvalidRequestError, describe

__all__ = ["CheckedModel", "enum_text", "field_error"]


_PROBLEMS: dict[str, Callable[[dict[str, Any]], str]] = {
    "missing": lambda ctx: "required",
    "extra_forbidden": lambda ctx: "unknown field",
    "greater_than_equal": lambda ctx: f"must be >= {ctx['ge']}",
    "greater_than": lambda ctx: f"must be > {ctx['gt']}",
    "less_than_equal": lambda ctx: f"must be <= {ctx['le']}",
    "finite_number": lambda ctx: "must be a finite number",
    "enum": lambda ctx: f"must be one of {ctx['expected']}",
    "value_error": lambda ctx: str(ctx["error"]),
}


def field_error(context: str, exc: ValidationError, fields: Iterable[str]) -> InvalidRequestError:
    """The first problem ``exc`` reports, as an error naming the field.

    ``context`` says where (``"policies.yaml: policy 'x' (#2)"``); ``fields``
    are the model's fields, to suggest one for a typo.
    """
    errors = exc.errors(include_url=False)
    # An unknown field first: a typo ("efect:") is why a required one is missing.
    err = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    where = where.lstrip(".") or "policy"
    explain = _PROBLEMS.get(err["type"])
    problem = explain(err.get("ctx") or {}) if explain else str(err["msg"])
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
        close = difflib.get_close_matches(str(err["loc"][0]), list(fields), n=1)
        if close:
            problem += f" (did you mean '{close[0]}'?)"
    elif err["type"] != "missing":
        problem += f" (got {describe(err['input'])})"
    more = len(exc.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    value = None if err["type"] == "missing" else err.get("input")
    return InvalidRequestError(where, value, f"{context}: field '{where}': {problem}{tail}")


if TYPE_CHECKING:  # type checkers see the plain model (and its typed signature)
    CheckedModel = BaseModel
else:

    class _CheckedMeta(type(BaseModel)):
        """Makes ``Policy(...)`` raise :class:`InvalidRequestError` naming the field.

        pydantic raises its own ``ValidationError``; klockwork's callers catch
        one error type for bad input wherever it comes from. Only direct
        construction is wrapped: validation inside a model (a Policy's
        conditions) and ``model_validate`` keep pydantic's error, which the
        loaders turn into one message naming the file and policy.
        """

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().__call__(*args, **kwargs)
            except ValidationError as exc:
                raise field_error(cls.__name__, exc, cls.model_fields) from None

    class CheckedModel(BaseModel, metaclass=_CheckedMeta):
        """A model whose constructor raises InvalidRequestError naming the field."""


def enum_text(value: Any) -> Any:
    """Refuse a non-text enum value before ``Enum(value)`` sees it.

    Python's ``Enum`` formats a refused value with ``repr``, which may raise
    or recurse without end on hostile input; text and members pass on.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value
