"""Dependencies point one way: nrexp's modules import each other without a cycle (checked on the source,
module-level and function-level imports alike, so a cycle hidden inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nrexp"


def module_name(path: Path) -> str:
    return "nrexp" if path.name == "__init__.py" else f"nrexp.{path.stem}"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The nrexp modules `path` imports anywhere in its code (`from nrexp import x` counts as nrexp.x when
    x is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                base = ".".join(["nrexp", *([base] if base else [])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # nrexp.x.y -> nrexp.x
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.glob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, nodes coloured by state)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], stack[len(stack) :] = "open", [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_package_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "from nrexp import figures\n\ndef f():\n    from nrexp.writers import atomic_write\n"
        "    import nrexp.runs\n    from . import errors\n"
    )
    modules = {"nrexp", "nrexp.figures", "nrexp.writers", "nrexp.runs", "nrexp.errors"}
    assert imports_of(source, modules) == {"nrexp.figures", "nrexp.writers", "nrexp.runs", "nrexp.errors"}


def test_nrexp_has_no_import_cycle():
    graph = import_graph()
    assert graph.get("nrexp.cli"), "the graph is empty: were the modules found?"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_errors_imports_nothing_of_nrexp():
    assert import_graph()["nrexp.errors"] == set()


def test_runs_and_figures_know_nothing_of_training():
    """The readers and the figure helpers stay light: `nrexp report` imports no torch, and the figure
    helper process imports figures.py alone."""
    graph = import_graph()
    assert graph["nrexp.figures"] == set()
    assert graph["nrexp.runs"] <= {"nrexp.errors"}
    assert not graph["nrexp.evaluate"] & {"nrexp.train", "nrexp.cli", "nrexp.fused"}
