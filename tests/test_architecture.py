"""The shape of the code base, checked from its source: layers, import cycles, function length.

Layers, ground floor first (docs/architecture.md):
    engine/kernels/   pure compute                        imports nothing else of ours
    engine/data/      files, shards, loader, atomic I/O   may import engine.kernels
    engine/ (rest)    model, training, evaluation, CLI    may import engine.data, engine.kernels
    tools/, benchmarks/                                   run from the checkout; may import engine
The installed distribution holds only the package `engine` (one import root, so no name of ours
can shadow another distribution's), so engine never imports tools, benchmarks or tests, and
engine/__init__.py imports nothing: it runs before every import of engine.kernels.
Every import counts, at module level or inside a function: a cycle hidden
in a function body is still a cycle.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("engine", "tools", "benchmarks")
PROJECT = (*SCANNED, "tests")
# layer -> the layers it must never import
FORBIDDEN = {
    "kernels": {"data", "engine", "tools", "benchmarks", "tests"},
    "data": {"engine", "tools", "benchmarks", "tests"},
    "engine": {"tools", "benchmarks", "tests"},
}
MAX_FUNCTION_LINES = 80
LENGTH_CHECKED = ("engine",)


def layer(module: str) -> str:
    """kernels, data or engine for the installed package's modules; else the top-level name."""
    parts = module.split(".")
    if parts[0] == "engine" and len(parts) > 1 and parts[1] in ("kernels", "data"):
        return parts[1]
    return parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the scanned packages."""
    return {
        module_name(path): path
        for package in SCANNED
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    }


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` is or lies in (None outside the project)."""
    if name.split(".")[0] not in PROJECT:
        return None
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return name.split(".")[0]


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement anywhere in the file."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in known else base for t in targets]
        for target in targets:
            resolved = _resolve(target, known)
            if resolved is not None and resolved != module:
                found.append((resolved, node.lineno))
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted({t for t, _ in graph.get(root, [])}))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child):], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted({t for t, _ in graph.get(child, [])})))
    return None


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        lines = dict(((a, b), line) for a in graph for b, line in graph[a])
        shown = [f"{a} -> {b} (line {lines[(a, b)]})" for a, b in itertools.pairwise(cycle)]
        pytest.fail("import cycle:\n  " + "\n  ".join(shown))


def test_no_upward_imports():
    modules = project_modules()
    problems = []
    for module, targets in import_graph().items():
        forbidden = FORBIDDEN.get(layer(module), set())
        for target, line in targets:
            if target != "engine" and layer(target) in forbidden:
                where = modules[module].relative_to(REPO_ROOT)
                problems.append(f"{where}:{line}: {module} imports {target}")
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_root_package_imports_nothing():
    """engine/__init__.py runs before engine.kernels and engine.data: it must stay empty of
    imports, or the ground floor would load the whole engine."""
    tree = ast.parse((REPO_ROOT / "engine" / "__init__.py").read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_benchmark_scripts_share_code_only_through_common():
    graph = import_graph()
    shared = {"benchmarks", "benchmarks.common"}
    problems = [
        f"{module} imports {target} (line {line}): move what both need to benchmarks/common.py"
        for module, targets in graph.items()
        if module.startswith("benchmarks.") and module not in shared
        for target, line in targets
        if target.startswith("benchmarks") and target not in shared
    ]
    assert not problems, "\n".join(problems)


def test_functions_fit_on_a_screen():
    found = {}
    for package in LENGTH_CHECKED:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found[(path.relative_to(REPO_ROOT).as_posix(), node.name)] = lines
    assert not found, (
        f"functions longer than {MAX_FUNCTION_LINES} lines (split them): "
        + ", ".join(f"{path}:{name} ({n})" for (path, name), n in sorted(found.items()))
    )


# --------------------------------------------------------------------------------------
# The checkers themselves catch what they are for
# --------------------------------------------------------------------------------------


def test_find_cycle_sees_direct_and_long_cycles():
    assert find_cycle({"a": [("b", 1)], "b": [("c", 2)], "c": []}) is None
    assert find_cycle({"a": [("b", 1)], "b": [("a", 3)]}) == ["a", "b", "a"]
    long = {"p": [("q", 1)], "q": [("r", 1)], "r": [("s", 1)], "s": [("q", 9)]}
    assert find_cycle(long) == ["q", "r", "s", "q"]


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "import os\n"
        "from engine import dist\n"
        "def f():\n"
        "    from engine.data.loader import BatchLoader\n"
        "    from . import sibling\n",
        encoding="utf-8",
    )
    known = {"engine", "engine.dist", "engine.data", "engine.data.loader", "engine.train.sibling"}
    found = imports_of("engine.train.mod", source, known)
    assert found == [("engine.dist", 2), ("engine.data.loader", 4), ("engine.train.sibling", 5)]


def test_layer_names_the_installed_packages_floors():
    assert layer("engine.kernels.kd_head") == "kernels"
    assert layer("engine.data.loader") == "data"
    assert layer("engine.train.step") == "engine"
    assert layer("engine") == "engine"
    assert layer("benchmarks.common") == "benchmarks"
