"""The API's OpenAPI schema, as committed in ``docs/openapi.json``.

Regenerate the committed file after changing a route or a model::

    python -m klockwork.server.openapi > docs/openapi.json

The text is stable (keys sorted, two-space indent, a final newline), so a
diff shows what changed; a test checks that the running app's schema is
the committed one.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from klockwork.core.engine import Klockwork
from klockwork.server.app import create_app

__all__ = ["REGENERATE", "render", "schema"]

#: The command that writes the committed schema (from the project's root).
REGENERATE = "python -m klockwork.server.openapi > docs/openapi.json"


def schema() -> dict[str, Any]:
    """The schema of an app with the default settings (over a throwaway engine)."""
    with Klockwork() as kw:
        return create_app(kw).openapi()


def render(document: dict[str, Any]) -> str:
    """``document`` as the committed file holds it: sorted keys, indent 2, a final newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    """Write the schema to standard output, as UTF-8 whatever the locale."""
    sys.stdout.buffer.write(render(schema()).encode("utf-8"))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
