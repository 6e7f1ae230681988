"""LangChain's standard tool test suites, run on protected tools."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.tools import BaseTool, tool
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests

from klockwork import Klockwork
from klockwork.integrations.langchain import klock_protected, protect_tool


@pytest.fixture(autouse=True)
def default_engine() -> Iterator[Klockwork]:
    # The tools below use Klockwork.default(): give each test a fresh one.
    engine = Klockwork()
    Klockwork.set_default(engine)
    yield engine
    Klockwork.set_default(None)
    engine.close()


@tool
def write_file(path: str, text: str) -> str:
    """Write text to the file at path."""
    return f"wrote {len(text)} characters to {path}"


@tool
@klock_protected("FILE:{path}")
def append_file(path: str, text: str) -> str:
    """Append text to the file at path."""
    return f"appended {len(text)} characters to {path}"


EXAMPLE = {"path": "/notes.txt", "text": "hello"}


class TestProtectToolUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return protect_tool(write_file, "FILE:{path}")

    @property
    def tool_invoke_params_example(self) -> dict[str, str]:
        return EXAMPLE


class TestProtectToolIntegration(ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return protect_tool(write_file, "FILE:{path}")

    @property
    def tool_invoke_params_example(self) -> dict[str, str]:
        return EXAMPLE


class TestDecoratedToolUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return append_file

    @property
    def tool_invoke_params_example(self) -> dict[str, str]:
        return EXAMPLE


class TestDecoratedToolIntegration(ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return append_file

    @property
    def tool_invoke_params_example(self) -> dict[str, str]:
        return EXAMPLE


# Tools used under KlockworkMiddleware: the middleware wraps the call, never
# the tool object, so the very tool an agent was built with keeps passing.
def _agent_tool() -> BaseTool:
    from langchain.agents import create_agent
    from lc_helpers import scripted

    from klockwork.integrations.langchain import KlockworkMiddleware

    middleware = KlockworkMiddleware(resources={"write_file": "FILE:{path}"})
    create_agent(scripted("done"), tools=[write_file], middleware=[middleware])
    return write_file


class TestToolUnderMiddlewareUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return _agent_tool()

    @property
    def tool_invoke_params_example(self) -> dict[str, str]:
        return EXAMPLE


class TestToolUnderMiddlewareIntegration(ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return _agent_tool()

    @property
    def tool_invoke_params_example(self) -> dict[str, str]:
        return EXAMPLE
