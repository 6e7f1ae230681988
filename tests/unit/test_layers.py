"""The walls of the house: what each folder may import, no circles, small modules.

The floors, bottom up (``klockwork/core/__init__.py`` says the same): the
ground floor (``model errors clock events notify``) → ``leases/rules`` →
``stores/`` → the pillars and the trail (``leases/ governance/ bus/
audit/``) → ``engine``, ``compat`` → ``integrations/``, ``cli/``,
``server/`` → the package's own ``__init__``. A module imports only from
its floor or below; modules on one floor may use each other as long as no
import circle forms. Imports are read with ``ast`` (module and function
level; ``if TYPE_CHECKING:`` blocks are type hints, not imports).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest
from support import ROOT

PACKAGE = ROOT / "klockwork"
MAX_LINES = 600

#: (module prefix, floor); the longest matching prefix decides.
FLOORS = [
    ("klockwork.core.model", 0),
    ("klockwork.core.errors", 0),
    ("klockwork.core.clock", 0),
    ("klockwork.core.events", 0),
    ("klockwork.core.notify", 0),
    ("klockwork.core.validation", 0),
    ("klockwork.core.leases.rules", 1),
    ("klockwork.core.bus.model", 0),
    ("klockwork.core.bus.rules", 1),
    ("klockwork.core.stores", 2),
    ("klockwork.core.leases", 3),
    ("klockwork.core.governance", 3),
    ("klockwork.core.bus", 3),
    ("klockwork.core.audit", 3),
    ("klockwork.core.engine", 4),
    ("klockwork.core.compat", 4),
    ("klockwork.core", 4),  # the package docstring
    ("klockwork.integrations", 5),
    ("klockwork.cli", 5),
    ("klockwork.server", 5),
    ("klockwork", 6),
]
#: What the core must never import (it runs without LangChain).
FOREIGN_TO_CORE = ("klockwork.integrations", "klockwork.cli", "klockwork.server")
FOREIGN_TO_CORE += ("langchain", "langchain_core", "langgraph")


def floor(module: str) -> int:
    for prefix, level in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def modules(package: Path) -> dict[str, Path]:
    root = package.parent
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(module: str, path: Path) -> Iterable[str]:
    """Every module ``module`` imports at run time (names resolved, relative ones too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hints = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def graph(package: Path) -> dict[str, set[str]]:
    """Module → the modules of the package it imports (the nearest existing one per name)."""
    known = modules(package)
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for name in imports(module, path):
            while name and name not in known:
                name = name.rpartition(".")[0]
            # A package importing its own submodules is not a wall being crossed.
            if name and name != module and not module.startswith(name + "."):
                edges[module].add(name)
    return edges


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, targets in edges.items()
        for t in targets
        if floor(t) > floor(m)
    )


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


# -- the house as it is ------------------------------------------------------------------
def test_nothing_imports_upward() -> None:
    assert upward(graph(PACKAGE)) == []


def test_no_import_circles() -> None:
    assert circles(graph(PACKAGE)) == []


def test_the_core_imports_no_langchain_and_no_edge() -> None:
    offending = [
        f"{module} imports {name}"
        for module, path in modules(PACKAGE).items()
        if module.startswith("klockwork.core")
        for name in imports(module, path)
        if any(name == f or name.startswith(f + ".") for f in FOREIGN_TO_CORE)
    ]
    assert offending == []


def test_every_pillar_has_its_folder_and_says_what_it_may_import() -> None:
    for pillar in ("leases", "governance", "bus", "audit", "stores"):
        init = PACKAGE / "core" / pillar / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc, f"core/{pillar}/__init__.py needs a docstring"
        if pillar != "stores":
            assert "May import" in doc, f"core/{pillar}/__init__.py: say what it may import"
    flat = sorted(p.name for p in (PACKAGE / "core").glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= 8, flat


def test_no_module_over_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


# -- the check itself can fail ------------------------------------------------------------
def _house(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "klockwork" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "klockwork"


@pytest.mark.parametrize(
    ("statement", "where"),
    [
        ("from klockwork.core.engine import Klockwork", "module level"),
        ("def f():\n    import klockwork.integrations.langchain.tools", "inside a function"),
        ("from ..engine import Klockwork", "relative"),
    ],
)
def test_an_upward_import_is_caught(tmp_path: Path, statement: str, where: str) -> None:
    package = _house(
        tmp_path,
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/engine.py": "",
            "core/leases/__init__.py": "",
            "core/leases/rules.py": statement + "\n",
            "integrations/__init__.py": "",
            "integrations/langchain/__init__.py": "",
            "integrations/langchain/tools.py": "",
        },
    )
    assert upward(graph(package)), where


def test_a_circle_is_caught_and_type_hints_are_not_imports(tmp_path: Path) -> None:
    package = _house(
        tmp_path,
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/leases/__init__.py": "",
            "core/leases/manager.py": "from klockwork.core.leases import holding\n",
            "core/leases/holding.py": "from klockwork.core.leases.manager import M\n",
            "core/audit/__init__.py": "",
            "core/audit/log.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from klockwork.core.audit.chain import C\n"
            ),
            "core/audit/chain.py": "from klockwork.core.audit.log import L\n",
        },
    )
    assert circles(graph(package)) == [
        ["klockwork.core.leases.holding", "klockwork.core.leases.manager"]
    ]
