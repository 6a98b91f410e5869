"""The package layout's rules, read from the source with `ast` (nothing is imported):

ray_jobs -> pipelines / eval -> modeling -> configs, nothing imports ray_jobs, and no import cycles.
Every import counts for the direction rules, function-local ones included; the cycle check follows the imports
that run when a module loads (module level, outside `if TYPE_CHECKING:`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "modeling", "pipelines", "eval", "ray_jobs")
SCRIPTS = ("bench",)  # scripts that import the project: they obey the rules too, but nothing imports them


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "modeling.lm"
    target: str  # the project module imported, e.g. "modeling.compiled"
    line: int
    module_level: bool  # runs when `source` loads (not inside a function, not under TYPE_CHECKING)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    files = {}
    for top in PACKAGES + SCRIPTS:
        for path in sorted((ROOT / top).rglob("*.py")):
            files[module_name(path)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module):
    """(node, module_level) for every import statement of a module."""

    def visit(node: ast.AST, module_level: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, module_level
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                yield from visit(child, False)
            else:  # class bodies, module-level if / try / with run at import
                yield from visit(child, module_level)

    yield from visit(tree, True)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The deepest project module `name` names (a submodule, or the module holding an imported attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def project_imports(files: dict[str, Path] | None = None) -> list[Import]:
    files = project_files() if files is None else files
    modules = set(files)
    found = []
    for source, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, module_level in _import_nodes(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importing module's package upwards
                    package = source.split(".") if is_package else source.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, base] if base else package)
                names = [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != source:
                    found.append(Import(source, target, node.lineno, module_level))
    return found


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _report(bad: list[Import]) -> str:
    return "\n".join(f"  {i.source} (line {i.line}) imports {i.target}" for i in bad)


def find_cycle(imports: list[Import]) -> list[str] | None:
    """One cycle of the module-level import graph, as [a, b, ..., a], or None."""
    graph: dict[str, list[str]] = {}
    for i in imports:
        if i.module_level:
            graph.setdefault(i.source, []).append(i.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(set(graph.get(node, ()))):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return project_imports()


def test_the_scan_sees_the_project(imports):
    # Guards the rules below against passing on an empty or wrongly resolved graph.
    pairs = {(i.source, i.target, i.module_level) for i in imports}
    assert ("modeling.lm", "modeling.compiled", True) in pairs
    assert ("modeling.builders", "configs.schema", True) in pairs
    assert any(i.source.startswith("ray_jobs.") and not i.module_level for i in imports)
    assert {_top(i.source) for i in imports} >= {"modeling", "pipelines", "ray_jobs", "bench"}


def test_nothing_imports_ray_jobs(imports):
    bad = [i for i in imports if _top(i.target) == "ray_jobs" and _top(i.source) != "ray_jobs"]
    assert not bad, "ray_jobs holds thin entrypoints; nothing outside it may import them:\n" + _report(bad)


def test_modeling_imports_no_pipelines_eval_or_jobs(imports):
    bad = [i for i in imports if _top(i.source) == "modeling" and _top(i.target) in ("pipelines", "eval", "ray_jobs")]
    assert not bad, "modeling depends only on configs:\n" + _report(bad)


def test_configs_imports_nothing_else_of_the_project(imports):
    bad = [i for i in imports if _top(i.source) == "configs" and _top(i.target) != "configs"]
    assert not bad, "configs is the bottom layer:\n" + _report(bad)


def test_no_import_cycle(imports):
    cycle = find_cycle(imports)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_a_bad_import(tmp_path):
    # A fake tree: a module-level cycle through a relative import, and a function-local import of ray_jobs.
    files = {}
    for name, text in {
        "modeling.a": "from . import b\n",
        "modeling.b": "from modeling.a import x\n\ndef f():\n    import ray_jobs.train\n",
        "ray_jobs.train": "",
    }.items():
        path = tmp_path / f"{name.replace('.', '_')}.py"
        path.write_text(text)
        files[name] = path
    imports = project_imports(files)
    assert find_cycle(imports) == ["modeling.a", "modeling.b", "modeling.a"]
    assert [(i.source, i.target, i.module_level) for i in imports if i.target == "ray_jobs.train"] == [
        ("modeling.b", "ray_jobs.train", False)
    ]
