"""The import layers of DESIGN.md, read from the source (AST, lazy imports inside functions
included, so a module no test imports is checked too):

- ``spendstream`` (the domain core) imports no service package; only the composition roots that
  start services (the CLI and the dev stack) may;
- the services (``ingest_gateway``, ``query_api``, ``stream_processors``) never import each other;
- a stream stage imports only ``stream_processors.runtime``, its own package and ``spendstream``;
- production code imports nothing from the dev stack (the embedded broker and ClickHouse and the
  supervisor that starts them are for `spendstream dev`, the tests and the benchmarks).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingest_gateway", "query_api", "stream_processors")
PRODUCTION = ("spendstream", *SERVICES)
DEV_STACK = ("spendstream.devstack", "spendstream.embedded")
#: composition roots: they start services (and the dev stack), so they may import them
COMPOSITION_ROOTS = ("spendstream/cli.py", "spendstream/devstack.py")
#: the modules allowed to import the dev stack
DEV_STACK_USERS = (*COMPOSITION_ROOTS, "spendstream/embedded/")
#: stream_processors modules that are not stages: the CLI entry and its stage list
PROCESSORS_ROOT = ("stream_processors/main.py", "stream_processors/stages.py", "stream_processors/__init__.py")


def imported_names(path: Path) -> set[str]:
    """Every absolute module name an import in the file names (``from a import b`` gives a.b too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, *modules: str) -> bool:
    return any(name == module or name.startswith(module + ".") for module in modules)


def modules_of(package: str) -> list[tuple[str, set[str]]]:
    """(path relative to the repo, imported names) of every module of a top-level package."""
    return [
        (path.relative_to(REPO_ROOT).as_posix(), imported_names(path))
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    ]


def test_the_domain_core_imports_no_service():
    offenders = [
        f"{path}: {name}"
        for path, names in modules_of("spendstream")
        if not path.startswith(COMPOSITION_ROOTS)
        for name in sorted(names)
        if within(name, *SERVICES)
    ]
    assert offenders == []


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_import_each_other(service):
    others = [s for s in SERVICES if s != service]
    offenders = [
        f"{path}: {name}" for path, names in modules_of(service) for name in sorted(names) if within(name, *others)
    ]
    assert offenders == []


def test_a_stage_imports_only_runtime_its_own_package_and_the_core():
    offenders = []
    for path, names in modules_of("stream_processors"):
        parts = path.split("/")
        if path in PROCESSORS_ROOT or parts[1] == "runtime" or len(parts) < 3:
            continue
        own = f"stream_processors.{parts[1]}"
        offenders += [
            f"{path}: {name}"
            for name in sorted(names)
            if within(name, "stream_processors") and not within(name, own, "stream_processors.runtime")
        ]
    assert offenders == []


def test_runtime_imports_no_stage():
    offenders = [
        f"{path}: {name}"
        for path, names in modules_of("stream_processors")
        if path.startswith("stream_processors/runtime/")
        for name in sorted(names)
        if within(name, "stream_processors") and not within(name, "stream_processors.runtime")
    ]
    assert offenders == []


def test_production_modules_do_not_import_the_dev_stack():
    offenders = [
        f"{path}: {name}"
        for package in PRODUCTION
        for path, names in modules_of(package)
        if not path.startswith(DEV_STACK_USERS)
        for name in sorted(names)
        if within(name, *DEV_STACK)
    ]
    assert offenders == []


def test_the_check_sees_every_import_form(tmp_path: Path):
    source = tmp_path / "module.py"
    source.write_text(
        "from spendstream import embedded\n"
        "def lazy():\n"
        "    from spendstream.devstack import Stack\n"
        "import spendstream.embedded.kafka\n"
        "from spendstream.settings import Settings\n"
    )
    assert sorted(n for n in imported_names(source) if within(n, *DEV_STACK)) == [
        "spendstream.devstack", "spendstream.devstack.Stack", "spendstream.embedded", "spendstream.embedded.kafka",
    ]  # fmt: skip
