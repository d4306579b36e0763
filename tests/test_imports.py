"""The project's import structure, read from the source (no module is imported to check it).

No cycle among the modules of ``detector`` and ``training``, counting the command modules
that ``detector.cli`` imports by name; ``detector`` imports neither torch, nor plotting,
nor ``training``; the scoring core imports nothing but itself and numpy; the configuration
imports nothing of the engine's. And ``training.evaluation`` imports with torch blocked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from detector.cli import _TRAINING_COMMANDS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("detector", "training")
STDLIB = sys.stdlib_module_names


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def imported_names(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every module an import statement anywhere in the file names (inside functions and
    ``TYPE_CHECKING`` blocks too): ``from a import b`` names ``a.b`` where that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, with the packages whose ``__init__`` such an
    import runs first (not the importer's own packages, which are running already), and
    ``detector.cli``'s by-name imports of the training commands."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        targets: set[str] = set()
        for target in imported_names(path, name, modules):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in modules and (step == target or step not in own):
                    targets.add(step)
        graph[name] = targets - {name}
    graph["detector.cli"] |= {module for module, *_ in _TRAINING_COMMANDS.values()}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first, colouring the modules)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def top_levels(module: str) -> set[str]:
    modules = project_modules()
    return {name.split(".")[0] for name in imported_names(modules[module], module, modules)}


def test_find_cycle_finds_one_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_package_imports() -> None:
    graph = import_graph()
    assert "training.trainer.pipeline" in graph["training.trainer"]  # inside __getattr__
    assert "detector.scoring" in graph["detector.artifact"]  # its __init__ runs first
    assert "training.evaluation.plot" in graph["detector.cli"]  # by name, from the table


def test_no_module_of_the_project_takes_part_in_an_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_the_command_table_names_modules_that_exist() -> None:
    modules = project_modules()
    for module, add, run, _ in _TRAINING_COMMANDS.values():
        source = modules[module].read_text(encoding="utf-8")
        assert f"def {add}(" in source and f"def {run}(" in source, module


@pytest.mark.parametrize("module", sorted(m for m in project_modules() if m.startswith("detector")))
def test_detector_imports_no_torch_no_plotting_and_no_training(module: str) -> None:
    assert not top_levels(module) & {"torch", "matplotlib", "training"}


@pytest.mark.parametrize("module", sorted(m for m in project_modules() if ".scoring" in m))
def test_the_scoring_core_imports_itself_numpy_and_the_standard_library_only(module: str) -> None:
    modules = project_modules()
    for name in imported_names(modules[module], module, modules):
        top = name.split(".")[0]
        assert top in STDLIB or top == "numpy" or name.startswith("detector.scoring"), name
        assert top not in ("io", "os", "pathlib", "shutil", "tempfile"), name  # no files


def test_the_config_imports_nothing_of_the_engine() -> None:
    modules = project_modules()
    ours = {n for n in imported_names(modules["detector.config"], "detector.config", modules)
            if n.startswith("detector")}  # fmt: skip
    allowed = {"detector.errors", "detector.logs", "detector.payload", "detector.routing",
               "detector.scoring"}  # fmt: skip
    assert ours <= allowed


def test_the_evaluation_package_imports_with_torch_blocked() -> None:
    evaluation = sorted(m for m in project_modules() if m.startswith("training.evaluation"))
    code = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
        f"for name in {evaluation!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = [m for m in ('torch', 'matplotlib') if sys.modules.get(m) is not None]\n"
        "sys.exit(f'loaded {loaded}' if loaded else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(evaluation) >= 5  # the package and evaluate, nab, plot, synth
