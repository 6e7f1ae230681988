"""Every operation of the OpenAPI schema, fed generated input: never a 5xx, always as documented.

Schemathesis generates requests from the app's own schema (valid ones, and
ones that break it: a wrong type, a missing field, a path parameter that is
no id) and sends them in process with a key of each kind. Each answer must
be no server error, have a documented status and content type, match its
documented schema, and, for a 4xx, be the API's error body. A request the
schema calls invalid must be refused (4xx), never half applied.

The streams (Server-Sent Events) never end, so they are left to their own
tests; blocking waits are cut to ``max_wait_s`` = 0.2 s. The examples are
the same on every run; ``KLOCKWORK_FUZZ_RANDOM=1`` draws new ones, and
``KLOCKWORK_FUZZ_EXAMPLES=200`` more of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from api_support import Keys, bearer, make_keys
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from klockwork import Klockwork
from klockwork.server import ServerSettings, create_app
from klockwork.server.errors import ErrorBody

load_all_checks()
CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
#: Examples per operation (``KLOCKWORK_FUZZ_EXAMPLES``, default 20: the file runs in < 1 min).
EXAMPLES = int(os.environ.get("KLOCKWORK_FUZZ_EXAMPLES", "20"))
#: ``KLOCKWORK_FUZZ_RANDOM=1``: new examples each run (CI runs the same ones every time).
RANDOM = bool(os.environ.get("KLOCKWORK_FUZZ_RANDOM"))


def _operations() -> list[str]:
    """``METHOD /path`` of every operation of the schema but the endless streams."""
    with Klockwork() as kw:
        paths = create_app(kw).openapi()["paths"]
    found = []
    for path, methods in paths.items():
        for method, spec in methods.items():
            content = spec.get("responses", {}).get("200", {}).get("content", {})
            if "text/event-stream" in content or path.endswith("/stream"):
                continue
            found.append(f"{method.upper()} {path}")
    return found


OPERATIONS = _operations()


def test_the_schema_has_the_operations_of_every_part() -> None:
    for part in ("/v1/health", "/v1/keys", "/v1/approvals", "/v1/leases", "/v1/gates"):
        assert any(op.split(" ", 1)[1].startswith(part) for op in OPERATIONS), part


@pytest.fixture
def fuzzed(kw: Klockwork) -> Iterator[tuple[FastAPI, Keys]]:
    app = create_app(kw, ServerSettings(max_wait_s=0.2, max_failures=10**9))
    keys = make_keys(app.state.server.keys)
    # Something to find: a pending approval, a lease, a gate event.
    kw.gates.execute("builder", "deploy.prod", {"version": "1"})
    kw.leases.acquire("reviewer", "s0", [("FILE:/repo/main", "MUTATES")])
    yield app, keys


def _error_body(response: Any, case: Any) -> None:
    if 400 <= response.status_code < 500:
        body = response.json()
        ErrorBody.model_validate(body)
        assert body["error"]["type"], (case.method, case.path, body)


def _fuzz(app: FastAPI, key: str, operation: str, mode: GenerationMode) -> None:
    method, path = operation.split(" ", 1)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    api_operation = schema[path][method]
    checks = [CHECKS.get_one(name) for name in CHECK_NAMES]

    @given(case=api_operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(headers=bearer(key))
        case.validate_response(response, checks=checks, headers=bearer(key))
        _error_body(response, case)

    try:
        run()
    except Unsatisfiable:
        # Nothing of this operation can break its schema (no body, no
        # constrained parameter): its valid inputs are the positive run's.
        assert mode is GenerationMode.NEGATIVE


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_an_admin_key(fuzzed: tuple[FastAPI, Keys], operation: str, mode: GenerationMode) -> None:
    app, keys = fuzzed
    _fuzz(app, keys.admin, operation, mode)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_an_agent_key(fuzzed: tuple[FastAPI, Keys], operation: str) -> None:
    app, keys = fuzzed
    _fuzz(app, keys.agent, operation, GenerationMode.POSITIVE)


_INTENTS = [{"resource": "FILE:/a", "predicate": "MUTATES"}]
#: A valid body of each operation with integer fields, and one such field.
INTEGER_FIELDS = [
    ("/v1/leases", {"session_id": "s", "intents": _INTENTS}, "ttl_ms"),
    ("/v1/audit/verify", {"ts": 1, "seq": 0, "hash": "0" * 64}, "seq"),
    ("/v1/bus/jobs/publish", {"payload": {}}, "deliver_at"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "field"), INTEGER_FIELDS, ids=[p for p, _, _ in INTEGER_FIELDS]
)
def test_a_boolean_is_no_integer(
    fuzzed: tuple[FastAPI, Keys], path: str, body: dict[str, Any], field: str
) -> None:
    app, keys = fuzzed
    with TestClient(app) as client:
        assert client.post(path, headers=bearer(keys.admin), json=body).status_code == 200
        for wrong in (True, "5"):
            answer = client.post(path, headers=bearer(keys.admin), json={**body, field: wrong})
            assert answer.status_code == 422, (field, wrong, answer.text)
            assert answer.json()["error"]["argument"] == field
