"""Every third-party package the code imports is declared in pyproject.toml.

The imports are read from the source (AST, lazy imports inside functions included) and mapped to
the distributions that provide them (``importlib.metadata.packages_distributions()``, i.e. what
is installed from the lock). A package that is only installed because something else depends on
it (aiohttp via Faust, starlette via FastAPI) would vanish the day that dependency drops it, so
the production packages may import only what ``[project].dependencies`` declares, and the tests
and benchmarks only that or the ``dev`` extra.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterable, Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PRODUCTION = tuple(p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])
DEV = ("tests", "bench")


def declared(requirements: Iterable[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


RUNTIME_DEPENDENCIES = declared(PYPROJECT["project"]["dependencies"])
DEV_DEPENDENCIES = RUNTIME_DEPENDENCIES | declared(PYPROJECT["project"]["optional-dependencies"]["dev"])


def python_files(roots: Iterable[str]) -> Iterator[Path]:
    for root in roots:
        yield from (p for p in (REPO_ROOT / root).rglob("*.py") if "__pycache__" not in p.parts)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in caught)


def imported_modules(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(top-level module, line, optional) of every absolute import in the file; optional: inside a
    ``try`` that catches ImportError (e.g. a module new in a later Python, with its fallback)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    optional = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.Try) and any(_catches_import_error(h) for h in block.handlers)
        for statement in block.body
        for node in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.partition(".")[0], node.lineno, id(node) in optional
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.partition(".")[0], node.lineno, id(node) in optional


def local_modules(roots: Iterable[str]) -> set[str]:
    """What the code under ``roots`` imports from the repository itself: the packages, and the
    helper modules pytest and the benchmarks put on sys.path (tests/integration/..._support.py)."""
    names = set(PRODUCTION) | set(DEV)
    for path in python_files(roots):
        names.add(path.stem)
        names.update(part for part in path.relative_to(REPO_ROOT).parts[:-1])
    return names


def undeclared(paths: Iterable[Path], allowed: set[str]) -> list[str]:
    """One line per import in ``paths`` of a third-party module no distribution in ``allowed`` provides."""
    local = local_modules(PRODUCTION + DEV)
    providers = packages_distributions()
    problems = []
    for path in paths:
        for module, line, optional in imported_modules(path):
            if module in sys.stdlib_module_names or module == "__future__" or module in local:
                continue
            where = f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}:{line}: {module}"
            distributions = {canonicalize_name(d) for d in providers.get(module, [])}
            if not distributions:
                if not optional:
                    problems.append(f"{where} is provided by no installed distribution")
            elif not distributions & allowed:
                problems.append(f"{where} comes from {', '.join(sorted(distributions))}, which is not declared")
    return sorted(set(problems))


def test_production_packages_import_only_declared_dependencies() -> None:
    problems = undeclared(python_files(PRODUCTION), RUNTIME_DEPENDENCIES)
    assert not problems, "declare these in [project].dependencies:\n" + "\n".join(problems)


def test_tests_and_benchmarks_import_only_declared_dependencies() -> None:
    problems = undeclared(python_files(DEV), DEV_DEPENDENCIES)
    assert not problems, "declare these in [project.optional-dependencies].dev:\n" + "\n".join(problems)


def test_the_check_finds_an_undeclared_import_by_its_distribution(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text(
        "import json\n"
        "import httpx\n"
        "def lazy():\n"
        "    import yaml.constructor\n"  # the distribution is PyYAML, a dev dependency only
        "try:\n"
        "    from compression import zstd\n"  # Python 3.14+; optional, nothing installs it here
        "except ImportError:\n"
        "    from backports import zstd\n"
        "import not_installed_anywhere\n"
    )
    assert undeclared([source], RUNTIME_DEPENDENCIES) == [
        f"{source}:4: yaml comes from pyyaml, which is not declared",
        f"{source}:9: not_installed_anywhere is provided by no installed distribution",
    ]
    assert undeclared([source], DEV_DEPENDENCIES) == [
        f"{source}:9: not_installed_anywhere is provided by no installed distribution",
    ]
