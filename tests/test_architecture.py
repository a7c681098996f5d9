"""The shape of the code base, checked from its source: layers, import cycles, function length;
and how far one optimizer step reaches (the files it runs, the modules it imports).

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
import sys
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


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`: imports for annotations, never run."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(
                node.test, "attr", None)) == "TYPE_CHECKING":
            skipped.update(id(child) for part in node.body for child in ast.walk(part))
    return skipped


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement anywhere in the file that
    can run (those under `if TYPE_CHECKING:` never do)."""
    is_package = path.name == "__init__.py"
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    never_run = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in never_run:
            continue
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


TEACHER_MODULES = ("engine/train/teacher_signal.py", "engine/train/teacher_source.py",
                   "engine/model/network.py")


def teacher_type_checks(source: str, teacher_types: set[str]) -> list[str]:
    """The isinstance / issubclass calls of `source` whose class argument names one of
    `teacher_types` (or torch's Module), with their line numbers."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            if names & (teacher_types | {"Module"}):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_step_never_asks_which_teacher_it_has():
    """One path in the training step: the teacher signal (engine/train/teacher_signal.py)
    computes its side and the loss, whatever the source (live, cache, none, on-policy)."""
    teacher_types = {
        node.name
        for path in TEACHER_MODULES
        for node in ast.walk(ast.parse((REPO_ROOT / path).read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef)
    }
    assert {"CachedTeacher", "LiveTeacher", "GPTNeoX"} <= teacher_types
    step = (REPO_ROOT / "engine/train/step.py").read_text(encoding="utf-8")
    found = teacher_type_checks(step, teacher_types)
    assert not found, "engine/train/step.py branches on a teacher type: " + "; ".join(found)


STRATEGY_FREE = ("engine/train/loop.py", "engine/train/step.py")
KIND_WORDS = {"fsdp", "ddp", "single"}


def parallelism_branches(source: str) -> list[str]:
    """Where `source` asks which parallelism it runs under: a name or attribute containing
    "sharded" (self.sharded, fsdp.is_sharded(...)), a comparison with "fsdp" / "ddp" or
    with a `strategy` / `kind` value, an isinstance on a DDP / FSDP class."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = (node.id if isinstance(node, ast.Name) else
                node.attr if isinstance(node, ast.Attribute) else None)
        if name is not None and "sharded" in name.lower():
            found.append(f"line {node.lineno}: {name}")
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            words = {p.value.lower() for p in parts
                     if isinstance(p, ast.Constant) and isinstance(p.value, str)}
            named = {p.id if isinstance(p, ast.Name) else p.attr for p in parts
                     if isinstance(p, (ast.Name, ast.Attribute))}
            if words & KIND_WORDS or named & {"strategy", "kind"}:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance" and len(node.args) == 2):
            classes = {n.id if isinstance(n, ast.Name) else n.attr
                       for n in ast.walk(node.args[1])
                       if isinstance(n, (ast.Name, ast.Attribute))}
            if any(c in ("FSDP", "DDP", "DistributedDataParallel", "FSDPModule")
                   for c in classes):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_loop_and_the_step_never_ask_which_parallelism_runs():
    """Parallelism is applied once (engine/train/strategy.py): the loop and the step call the
    strategy's methods and never branch on one process / DDP / FSDP themselves."""
    for path in STRATEGY_FREE:
        found = parallelism_branches((REPO_ROOT / path).read_text(encoding="utf-8"))
        assert not found, f"{path} branches on the parallelism kind: " + "; ".join(found)


LOSS_KEYWORDS = {"alpha", "temperature", "divergence", "beta", "skew", "t2_scale"}
MAX_LOSS_KEYWORD_FUNCTIONS = 2


def exported_kernel_names() -> set[str]:
    """The names engine/kernels/__init__.py lists in __all__: the kernels' public API."""
    tree = ast.parse((REPO_ROOT / "engine/kernels/__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("engine/kernels/__init__.py has no __all__")


def loss_keyword_functions(source: str, exempt: set[str]) -> list[str]:
    """Functions of `source` (not named in `exempt`) taking three or more LOSS_KEYWORDS."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in exempt:
            args = node.args
            names = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
            if len(names & LOSS_KEYWORDS) >= 3:
                found.append(f"{node.name} ({', '.join(sorted(names & LOSS_KEYWORDS))})")
    return found


def test_the_loss_settings_travel_as_one_spec():
    """Inside the engine the LossSpec travels (engine/kernels/loss_spec.py), not loose
    keywords: outside the kernels' public API at most two functions take three or more of
    them."""
    exported = exported_kernel_names()
    found = []
    for path in sorted((REPO_ROOT / "engine").rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).as_posix()
        exempt = exported if relative.startswith("engine/kernels/") else set()
        found += [f"{relative}: {name}"
                  for name in loss_keyword_functions(path.read_text(encoding="utf-8"), exempt)]
    assert len(found) <= MAX_LOSS_KEYWORD_FUNCTIONS, (
        f"{len(found)} functions take loose loss keywords (at most "
        f"{MAX_LOSS_KEYWORD_FUNCTIONS}; pass a LossSpec): " + "; ".join(found))


# One optimizer step reads in few files: the code it runs and the modules it imports.
MAX_STEP_FILES = 10
MAX_STEP_IMPORTS = 20
STEP_MODULE = "engine.train.step"


def transitive_imports(graph: dict[str, list[tuple[str, int]]], root: str) -> set[str]:
    """The project modules importing `root` loads, `root` aside: every import statement of
    every module reached (inside functions too), and the package __init__ of each module
    reached, which Python runs before the module itself."""
    seen, todo = set(), [root]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        packages = [".".join(parts[:end]) for end in range(1, len(parts))]
        todo += [target for target, _ in graph.get(module, []) if target in graph]
        todo += [package for package in packages if package in graph]
    return seen - {root}


def traced_files(function) -> set[str]:
    """The files under engine/ whose code runs while `function()` runs, relative to the
    checkout (sys.setprofile sees every Python function call of this thread)."""
    engine_dir = REPO_ROOT / "engine"
    files = set()

    def profile(frame, event, arg):
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(engine_dir):
            files.add(path.relative_to(REPO_ROOT).as_posix())

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(previous)
    return files


def test_one_optimizer_step_runs_code_in_few_files(tmp_path):
    """Traced from the first call of Trainer.train_step to its return, on the tiny training
    assets (tests/engine/test_train.py), after one untraced step (first-step set-up)."""
    from engine import dist
    from engine.train.loop import Trainer
    from tests.engine.test_train import make_assets, make_config

    config = make_config(make_assets(tmp_path / "assets"), tmp_path / "out")
    trainer = Trainer(config, dist.init_distributed(config.device))
    try:
        trainer.train_step()
        files = traced_files(trainer.train_step)
    finally:
        trainer.writer.close()
    if "engine/train/step.py" not in files:  # not an AssertionError: never an expected failure
        pytest.fail(f"the tracer did not see the step: {sorted(files)}")
    assert len(files) <= MAX_STEP_FILES, (
        f"one optimizer step runs code in {len(files)} files (at most {MAX_STEP_FILES}): "
        + ", ".join(sorted(files)))


def test_the_step_module_imports_few_modules():
    """Package __init__s and imports inside functions count (transitive_imports); imports
    under `if TYPE_CHECKING:` (annotations) never run and do not."""
    found = transitive_imports(import_graph(), STEP_MODULE)
    assert len(found) <= MAX_STEP_IMPORTS, (
        f"{STEP_MODULE} imports {len(found)} project modules (at most {MAX_STEP_IMPORTS}): "
        + ", ".join(sorted(found)))


# --------------------------------------------------------------------------------------
# The checkers themselves catch what they are for
# --------------------------------------------------------------------------------------


def test_imports_for_annotations_only_do_not_count(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "import engine.dist\n"
                      "if TYPE_CHECKING:\n    from engine.kernels import LossSpec\n"
                      "if typing.TYPE_CHECKING:\n    import engine.model\n")
    known = {"engine.dist", "engine.kernels", "engine.model"}
    assert imports_of("engine.mod", source, known) == [("engine.dist", 2)]


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


def test_teacher_type_checks_sees_isinstance_on_a_teacher():
    source = ("if isinstance(teacher, CachedTeacher):\n    pass\n"
              "isinstance(x, (int, torch.nn.Module))\n")
    assert len(teacher_type_checks(source, {"CachedTeacher"})) == 2
    assert teacher_type_checks("isinstance(x, int)\n", {"CachedTeacher"}) == []


def test_loss_keyword_functions_counts_every_kind_of_parameter():
    source = ("def a(x, alpha, temperature, *, skew): pass\n"
              "def b(alpha, beta): pass\n"
              "def kd_loss(alpha, temperature, beta): pass\n")
    assert loss_keyword_functions(source, {"kd_loss"}) == ["a (alpha, skew, temperature)"]


def test_transitive_imports_count_packages_and_imports_in_functions():
    graph = {
        "engine": [],
        "engine.train": [],
        "engine.train.step": [("engine.kernels.loss_spec", 3), ("os", 1)],
        "engine.kernels": [("engine.kernels.kd_head", 1)],
        "engine.kernels.loss_spec": [("engine.kernels.kd_loss_triton", 40)],  # in a function
        "engine.kernels.kd_head": [],
        "engine.kernels.kd_loss_triton": [],
        "engine.unrelated": [],
    }
    assert transitive_imports(graph, "engine.train.step") == {
        "engine", "engine.train", "engine.kernels", "engine.kernels.loss_spec",
        "engine.kernels.kd_head", "engine.kernels.kd_loss_triton"}


def test_traced_files_sees_the_engine_files_a_call_runs():
    from engine.precision import canonical_name

    assert traced_files(lambda: canonical_name("bfloat16")) == {"engine/precision.py"}
    assert traced_files(lambda: sorted([3, 1])) == set()


def test_parallelism_branches_sees_each_kind_of_branch():
    source = ("if self.sharded:\n    pass\n"
              "x = fsdp.is_sharded(model)\n"
              "y = config.dist.strategy == 'ddp'\n"
              "z = self.parallel.kind != other\n"
              "isinstance(m, DistributedDataParallel)\n")
    assert len(parallelism_branches(source)) == 5
    assert parallelism_branches("self.parallel.export(student, where)\nif a == 'b':\n"
                                "    pass\n") == []
