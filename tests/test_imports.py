"""The project's modules import each other without a circle, its packages import one way only (LAYERS, below; the
order docs/design.md "Layers" explains), and alure/ (the workload) never imports bench/ (the harness). Imports inside functions count too: a lazy import only hides a circle until the day it bites. Imports under
`if __name__ == "__main__":` do not: run as a script, a module is __main__, not itself."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alure", "bench")

LAYERS = ("alure", "bench.errors", "bench.host", "bench.plan", "bench.results", "bench.launch", "bench.model",
          "bench.ranks", "bench.run", "bench.slurm", "bench.cli")
"""The packages from the bottom up: a module may import its own package and those below it, never one above."""

def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project modules a module's code imports (a `from package import module` names the module)."""
    found = set()
    for node in _nodes_outside_main(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _nodes_outside_main(tree: ast.AST):
    """Every node but those under `if __name__ == "__main__":`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not (isinstance(child, ast.If) and ast.unparse(child.test).replace("'", '"') == '__name__ == "__main__"'):
                todo.append(child)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(ast.parse(path.read_text(), str(path)), modules) - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finds_a_circle_where_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles, found one at a time and each broken at its last edge to find the next."""
    graph = {name: set(deps) for name, deps in graph.items()}
    found = []
    while cycle := find_cycle(graph):
        found.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return found


def test_no_import_circle_among_project_modules():
    found = circles(import_graph())
    assert not found, "import circle: " + "; ".join(" -> ".join(c) for c in found)


def test_alure_never_imports_bench():
    offenders = {name: sorted(deps) for name, deps in import_graph().items()
                 if name.startswith("alure") and any(d.startswith("bench") for d in deps)}
    assert not offenders, offenders


def layer(module: str) -> str:
    """The package of LAYERS a module belongs to (its top two names; alure whole)."""
    return "alure" if module.split(".")[0] == "alure" else ".".join(module.split(".")[:2])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up LAYERS (or into a package LAYERS does not place), as 'module -> module'."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for module, deps in sorted(graph.items()):
        if module in ("bench", "bench.__init__"):
            continue
        for dep in sorted(deps):
            if layer(dep) not in rank or layer(module) not in rank or rank[layer(dep)] > rank[layer(module)]:
                bad.append(f"{module} -> {dep}")
    return bad


def test_finds_an_import_up_the_layers():
    graph = {"bench.plan.config": {"bench.host"}, "bench.host": {"bench.plan.config"}, "bench.extra.x": set()}
    assert upward_imports(graph) == ["bench.host -> bench.plan.config"]
    assert upward_imports({"bench.cli.x": {"bench.nowhere.y"}}) == ["bench.cli.x -> bench.nowhere.y"]


def test_packages_import_down_the_layers_only():
    bad = upward_imports(import_graph())
    assert not bad, "imports up the layers (tests/test_imports.py LAYERS):\n" + "\n".join(bad)


def local_imports_without_a_reason() -> list[str]:
    """Imports of a project module inside a function with no comment on their line or the line above: an import
    belongs at the top unless something says why not (a rank-only or optional dependency such as torch)."""
    found = []
    for path in project_modules().values():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(m.split(".")[0] in PACKAGES for m in mods):
                    said = "#" in "".join(lines[node.lineno - 1:node.end_lineno])
                    if not said and not lines[node.lineno - 2].strip().startswith("#"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_an_import_inside_a_function_says_why():
    found = local_imports_without_a_reason()
    assert not found, "imports inside functions with no reason given (move them up, or say why):\n" + "\n".join(found)
