"""Which resources a tool call leases: templates, extractors and manifests.

A protection names its resources once, as a *spec*: a template formatted
with the call's named arguments (``"FILE:{path}"``), an extractor that gets
them as a dict and returns one ``TYPE:path`` key or several, or a list of
these (one atomic manifest). Klock's signature gives a ``resource_type``
and an extractor of paths instead (:func:`klock_resolver`).

Two kinds of mistakes are told apart, because they belong to different
people:

* the **protection's configuration** (a template naming a parameter the
  function does not have, an extractor that is not a one-argument callable)
  raises :class:`~klockwork.InvalidRequestError` — at decoration time when
  the function's signature shows it, else on the call;
* an **argument the model chose** (an empty ``path``, a path escaping its
  root with ``..``, an extractor failing on the arguments) raises
  :class:`ArgumentProblem`, which the guard turns into a
  :class:`~.errors.ToolArgumentError` the model reads as an error
  ``ToolMessage``.
"""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from klockwork.core.errors import InvalidRequestError
from klockwork.core.leases.rules import normalize_resource

__all__ = [
    "ArgumentProblem",
    "Extractor",
    "ResourceSpec",
    "Resources",
    "Resolver",
    "klock_resolver",
    "template_resolver",
]

#: Gets the call's named arguments; returns one ``TYPE:path`` key or several.
Extractor = Callable[[dict[str, Any]], str | Iterable[str] | None]
#: ``"FILE:{path}"``, an :data:`Extractor`, or a list of them (one atomic manifest).
ResourceSpec = str | Extractor | Sequence[str | Extractor]


class ArgumentProblem(Exception):
    """A call's argument makes no usable resource (the model's mistake, not the code's)."""

    def __init__(self, argument: str, value: object, problem: str) -> None:
        self.argument = argument
        self.value = value
        self.problem = problem
        super().__init__(f"{argument}={value!r} {problem}")


class Resources(NamedTuple):
    """The resources of one call: normalised keys, and how the caller named them."""

    keys: list[str]
    label: str


class Resolver:
    """Turns a call's named arguments into its :class:`Resources`.

    Attributes:
        fields: argument names the templates use (checked against the
            protected function's parameters at decoration time).
    """

    __slots__ = ("_label", "_parts", "fields")

    def __init__(
        self,
        parts: Sequence[Callable[[dict[str, Any]], list[tuple[str, str, str]]]],
        fields: frozenset[str],
        label: Callable[[list[tuple[str, str, str]]], str],
    ) -> None:
        self._parts = parts
        self.fields = fields
        self._label = label

    def __call__(self, arguments: dict[str, Any]) -> Resources:
        """Resolve and normalise every key.

        Raises:
            ArgumentProblem: an argument makes an empty or invalid resource.
            InvalidRequestError: the spec itself is wrong for this call.
        """
        found = [item for part in self._parts for item in part(arguments)]
        keys = []
        for key, argument, shown in found:
            try:
                keys.append(normalize_resource(key))
            except InvalidRequestError as exc:
                value = arguments.get(argument, shown)
                raise ArgumentProblem(argument, value, _problem(exc.problem)) from None
        return Resources(keys, self._label(found))

    def check_parameters(self, fn: Callable[..., Any], parameters: Mapping[str, Any]) -> None:
        """Refuse, at decoration time, templates naming parameters ``fn`` does not have."""
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return  # **kwargs may carry anything
        missing = sorted(self.fields - set(parameters))
        if missing:
            raise InvalidRequestError(
                "resource",
                missing,
                f"names arguments {getattr(fn, '__name__', fn)!r} does not take "
                f"(its parameters: {', '.join(parameters) or 'none'})",
            )


def _problem(text: str) -> str:
    # rules.normalize_resource's wording, as a phrase after the argument's name.
    if text == "empty path":
        return "is empty"
    return text.removeprefix("path ")


def template_resolver(spec: ResourceSpec) -> Resolver:
    """Resolver for the short form: templates, extractors, or a list of them.

    A template is formatted with the call's named arguments
    (``"FILE:{path}"``); an extractor gets them as a dict and returns one
    resource key or several. A list makes one atomic manifest.

    Raises:
        InvalidRequestError: the spec is none of these (at decoration time).
    """
    items: list[str | Extractor]
    if isinstance(spec, str) or callable(spec):
        items = [spec]
    elif (
        isinstance(spec, Sequence) and spec and all(isinstance(i, str) or callable(i) for i in spec)
    ):
        items = list(spec)
    else:
        items = []
    if not items:
        raise InvalidRequestError(
            "resource",
            spec,
            "expected a 'TYPE:{argument}' template, a callable returning resource keys, "
            "or a non-empty list of them",
        )
    parts: list[Callable[[dict[str, Any]], list[tuple[str, str, str]]]] = []
    fields: set[str] = set()
    for item in items:
        if isinstance(item, str):
            template = _Template(item)
            fields.update(template.fields)
            parts.append(template)
        else:
            _check_extractor("resource", item)
            parts.append(_extractor_part("resource", item, lambda path: path))
    return Resolver(parts, frozenset(fields), lambda found: ", ".join(k for k, _, _ in found))


def klock_resolver(resource_type: str, extractor: Extractor) -> Resolver:
    """Resolver for Klock's signature: ``resource_type`` + ``extractor(kwargs) -> path(s)``.

    The label (``KlockConflictError.resource_path``) is the extractor's
    path, as Klock reports it.

    Raises:
        InvalidRequestError: ``resource_type`` is not a non-empty string, or
            ``extractor`` is not callable (at decoration time).
    """
    if not isinstance(resource_type, str) or not resource_type.strip():
        raise InvalidRequestError("resource_type", resource_type, "must be a type like 'FILE'")
    _check_extractor("resource_path_extractor", extractor)
    rtype = resource_type.strip()
    part = _extractor_part("resource_path_extractor", extractor, lambda path: f"{rtype}:{path}")
    return Resolver([part], frozenset(), lambda found: ", ".join(s for _, _, s in found))


# -- templates ----------------------------------------------------------------------
class _Formatter(string.Formatter):
    """``str.format`` that only takes named arguments, and refuses empty ones."""

    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, int):
            raise InvalidRequestError(
                "resource", key, "positional '{}' fields are not supported; name an argument"
            )
        if key not in kwargs:
            raise InvalidRequestError(
                "resource",
                key,
                f"names an argument the call does not have "
                f"(arguments: {', '.join(sorted(kwargs)) or 'none'})",
            )
        value = kwargs[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ArgumentProblem(key, value, "is empty")
        return value


_FORMATTER = _Formatter()


class _Template:
    """One ``TYPE:{argument}`` template; ``str.format_map`` when every field is plain."""

    __slots__ = ("fields", "plain", "template")

    def __init__(self, template: str) -> None:
        self.template = template
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as exc:
            raise InvalidRequestError(
                "resource", template, f"is not a valid template: {exc}"
            ) from None
        self.plain = all(n.isidentifier() for n in names)
        # The argument a key stands for, when one plain field makes it.
        self.fields = tuple(n for n in names if n.isidentifier())

    def __call__(self, arguments: dict[str, Any]) -> list[tuple[str, str, str]]:
        argument = self.fields[0] if len(self.fields) == 1 else "resource"
        if self.plain:
            for name in self.fields:
                value = arguments.get(name)
                if value is None or (type(value) is str and not value.strip()):
                    break
            else:
                key = self.template.format_map(arguments)
                return [(key, argument, key)]
        try:
            key = _FORMATTER.vformat(self.template, (), arguments)
        except (ArgumentProblem, InvalidRequestError):
            raise
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            # e.g. "{user.name}" on an object without .name, or a bad format spec.
            raise ArgumentProblem(
                argument, arguments.get(argument), f"does not fit {self.template!r}: {exc!r}"
            ) from exc
        return [(key, argument, key)]


# -- extractors ---------------------------------------------------------------------
def _check_extractor(argument: str, extractor: object) -> None:
    # An extractor is called with one argument, the call's arguments dict. A
    # tool function handed over by a bare ``@klock_protected`` usually is not.
    if not callable(extractor):
        raise InvalidRequestError(
            argument, extractor, "must be a callable taking the arguments dict"
        )
    try:
        inspect.signature(extractor).bind({})
    except TypeError:
        raise InvalidRequestError(
            argument,
            extractor,
            "must take exactly one argument, the call's arguments dict "
            "(a bare @klock_protected needs a resource: @klock_protected('FILE:{path}'))",
        ) from None
    except ValueError:  # no signature to check (some builtins): trust it
        pass


def _extractor_part(
    argument: str, extractor: Extractor, to_key: Callable[[str], str]
) -> Callable[[dict[str, Any]], list[tuple[str, str, str]]]:
    def part(arguments: dict[str, Any]) -> list[tuple[str, str, str]]:
        try:
            out = extractor(dict(arguments))  # a copy: the extractor cannot alter the call
        except (ArgumentProblem, InvalidRequestError):
            raise
        except Exception as exc:
            # Klock: an extractor failure is a ValueError (ToolArgumentError is one).
            raise ArgumentProblem(argument, sorted(arguments), f"raised {exc!r}") from exc
        values: list[object] = [out] if isinstance(out, str) or out is None else list(out)
        if not values:
            raise ArgumentProblem(argument, out, "gave no path; expected a non-empty path")
        found = []
        for value in values:
            # Name the tool argument the path came from when it is one of them
            # (``lambda args: args["path"]``): that is what the model can fix.
            source = _argument_of(value, arguments, argument)
            via = "" if source == argument else f" (as {argument} read it)"
            if not isinstance(value, str):
                raise ArgumentProblem(source, value, f"is not a path{via}")
            if not value.strip():
                raise ArgumentProblem(source, value, f"is empty{via}")
            found.append((to_key(value), source, value))
        return found

    return part


def _argument_of(value: object, arguments: Mapping[str, Any], default: str) -> str:
    for name, given in arguments.items():
        if given is value or (type(given) is str and given == value):
            return name
    return default
