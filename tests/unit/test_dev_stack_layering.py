"""Production code imports nothing from the dev stack.

The embedded broker and ClickHouse (spendstream/embedded/) and the supervisor that starts them
(spendstream/devstack.py) are for `spendstream dev`, the tests and the benchmarks; only the CLI,
the composition root that offers those commands, and the dev stack itself import them. Read from
the source (AST, lazy imports inside functions included), so a module that is never imported in
a test run is checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("spendstream", "ingest_gateway", "stream_processors", "query_api")
DEV_STACK = ("spendstream.devstack", "spendstream.embedded")
#: the modules allowed to import the dev stack
DEV_STACK_USERS = ("spendstream/cli.py", "spendstream/devstack.py", "spendstream/embedded/")


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


def is_dev_stack(name: str) -> bool:
    return any(name == module or name.startswith(module + ".") for module in DEV_STACK)


def test_production_modules_do_not_import_the_dev_stack() -> None:
    offenders = []
    for package in PRODUCTION:
        for path in (REPO_ROOT / package).rglob("*.py"):
            relative = path.relative_to(REPO_ROOT).as_posix()
            if "__pycache__" in path.parts or relative.startswith(DEV_STACK_USERS):
                continue
            offenders += [f"{relative}: {name}" for name in sorted(imported_names(path)) if is_dev_stack(name)]
    assert offenders == []


def test_the_check_sees_every_import_form(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text(
        "from spendstream import embedded\n"
        "def lazy():\n"
        "    from spendstream.devstack import Stack\n"
        "import spendstream.embedded.kafka\n"
        "from spendstream.settings import Settings\n"
    )
    assert sorted(n for n in imported_names(source) if is_dev_stack(n)) == [
        "spendstream.devstack", "spendstream.devstack.Stack", "spendstream.embedded", "spendstream.embedded.kafka",
    ]  # fmt: skip
