"""The package's shape: imports point downward only (no circle among subpackages), and the budget
arithmetic imports nothing else of the package. Read from the source with ``ast``: every import that
runs counts (a function's lazy import included); ``if TYPE_CHECKING:`` blocks do not."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlm_reroute"


def _unit(path: Path) -> str:
    """The subpackage (or top-level module) a file belongs to."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


class _Imports(ast.NodeVisitor):
    """The package-internal top-level units a module imports at run time."""

    def __init__(self, package: tuple[str, ...]) -> None:
        self.package, self.found = package, set()

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == "vlm_reroute" and len(parts) > 1:
                self.found.add(parts[1])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            parts = (node.module or "").split(".")
            if parts[0] == "vlm_reroute":
                targets = parts[1:2] or [alias.name for alias in node.names]
                self.found.update(targets)
            return
        base = list(self.package[: len(self.package) - (node.level - 1)])
        target = base + (node.module.split(".") if node.module else [])
        if target:
            self.found.add(target[0])
        else:  # "from . import x" at the package root
            self.found.update(alias.name for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        visitor = _Imports(path.relative_to(PACKAGE).parent.parts)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        unit = _unit(path)
        edges[unit] |= {target for target in visitor.found if target != unit}
    return edges


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_circle_among_subpackages():
    edges = import_graph()
    edges.pop("__init__", None)  # the package root re-exports names; it is the top, not a room
    circles = sorted(
        {
            tuple(sorted((a, b)))
            for a in edges
            for b in _reachable(edges, a)
            if a != b and a in _reachable(edges, b)
        }
    )
    assert circles == [], f"import circles between subpackages: {circles}"


def test_budget_imports_nothing_of_the_package():
    assert import_graph()["budget"] == set()


def test_the_graph_reader_sees_imports():
    """The reader is not vacuous: known downward arrows are found."""
    edges = import_graph()
    assert {"adapters", "budget", "scoring"} <= edges["methods"] | edges["engine"]
    assert "engine" in edges["methods"] and "adapters" in edges["engine"]
