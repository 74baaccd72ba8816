"""Every package our code imports is declared in pyproject.toml, not merely installed as another package's dependency.

How: each module of `iconface_jax` and `convert` is parsed (`ast`, nothing imported) and each absolute import of a
third-party package is mapped to its distribution (`importlib.metadata.packages_distributions()`: `cv2` ->
opencv-python-headless, `PIL` -> pillow; a package not installed maps to its own name). Imports that run when a
module is imported must name a `[project].dependencies` entry: `pip install .` alone must import every module.
Imports inside functions (or under `if TYPE_CHECKING:`) are optional features, as is every import of a module in
`OPTIONAL_MODULES`: they may name an extra instead, or sit in a `try` that catches ImportError (the code then says
what to install). A second test removes each imported main dependency in turn and expects the check to report it.

Why not a fresh virtualenv with `pip install .` and an import of every module: minutes of installing per CI run.
Why not an import hook that refuses undeclared distributions: it must tell our imports from the libraries' own
(jax imports scipy itself), and it never sees the imports inside functions. Reading the source sees all of them.
"""
from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("iconface_jax", "convert")
# Modules whose purpose is an optional framework: their import-time imports may name an extra.
OPTIONAL_MODULES = {"convert/torch_pathways.py": "the PyTorch reference for exported files (torch by design)"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def declared(pyproject: dict) -> tuple[set[str], set[str]]:
    """(main dependencies, dependencies of any extra) as normalised distribution names."""
    names = lambda reqs: {_normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip())[0]) for r in reqs}
    project = pyproject["project"]
    return names(project["dependencies"]), set().union(*map(names, project.get("optional-dependencies", {}).values()))


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(t is None or getattr(t, "id", "") in ("ImportError", "ModuleNotFoundError", "Exception") for t in types)


def third_party_imports(tree: ast.Module) -> list[tuple[str, int, bool, bool]]:
    """(top-level package, line, runs at module import, guarded by `except ImportError`) of each absolute import."""
    out = []

    def visit(node: ast.AST, deferred: bool, guarded: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
            for name in [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PACKAGES:
                    out.append((top, node.lineno, not deferred, guarded))
        # Inside a function, or under `if TYPE_CHECKING:` (never run): not needed to import the module.
        deferred = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        type_only = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        in_guard = isinstance(node, ast.Try) and any(map(_catches_import_error, node.handlers))
        for child in ast.iter_child_nodes(node):
            body = isinstance(node, ast.If | ast.Try) and child in node.body
            visit(child, deferred or type_only and body, guarded or in_guard and body)

    visit(tree, False, False)
    return out


def imports() -> list[tuple[str, int, str, set[str], bool, bool]]:
    """(file, line, package, its distributions, runs at module import, guarded) for every module's imports."""
    distributions = importlib.metadata.packages_distributions()
    out = []
    for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        for top, line, at_import, guarded in third_party_imports(ast.parse(path.read_text(), relative)):
            dists = {_normalise(d) for d in distributions.get(top, [top])}
            out.append((relative, line, top, dists, at_import and relative not in OPTIONAL_MODULES, guarded))
    return out


def undeclared(main: set[str], extras: set[str]) -> list[str]:
    """A message per import that needs a declaration it lacks (a main dependency, or an extra when optional)."""
    problems = []
    for relative, line, top, dists, required, guarded in imports():
        if dists & main or not required and (guarded or dists & extras):
            continue
        where = "[project].dependencies" if required else "[project].dependencies or an extra"
        problems.append(f"{relative}:{line} imports {top} ({', '.join(sorted(dists))}), not in pyproject's {where}")
    return problems


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_every_import_is_declared(pyproject):
    assert undeclared(*declared(pyproject)) == []


def test_removing_any_imported_dependency_is_caught(pyproject):
    """The check can fail: without any one main dependency that our code imports, that import is reported."""
    main, extras = declared(pyproject)
    imported = set().union(*(dists for _, _, _, dists, _, _ in imports())) & main
    assert {"scipy", "absl-py", "safetensors", "opencv-python-headless", "pillow", "jax"} <= imported
    for name in sorted(imported):
        assert any(f"({name})" in problem for problem in undeclared(main - {name}, extras)), name
