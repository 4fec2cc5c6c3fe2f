"""The spendstream wheel, installed outside the repository, migrates a database from zero.

The wheel is built from a copy of the sources (an in-tree build leaves build/ behind, whose stale
files would end up in later wheels) and installed into a fresh venv. That venv gets the
third-party packages by appending this venv's site-packages to its path (a .pth line: the
appended directory's own .pth files are not processed, so this venv's editable spendstream is
not loaded) and spendstream itself only from the wheel. ``spendstream migrate`` then runs from a
directory outside the repository against the session's ClickHouse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from spendstream.clickhouse import get_client
from spendstream.settings import Settings

pytestmark = pytest.mark.clickhouse

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [
    p.rstrip("*")
    for p in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
]
SCHEMA = sorted(p.name for p in (REPO_ROOT / "clickhouse" / "schema").glob("*.sql"))


def _run(argv: list[str | Path], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False, **kwargs)
    assert result.returncode == 0, f"{argv} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in [*PACKAGES, "clickhouse"]:
        # links kept: spendstream/schema points at ../clickhouse/schema, copied alongside
        shutil.copytree(REPO_ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    # the build backend of this venv (installed from the lock), as `make install` builds
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
          "--wheel-dir", dist, src])  # fmt: skip
    (built,) = dist.glob("spendstream-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", root / "v"])
    python = root / "v" / "bin" / "python"
    site_packages = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site_packages / "third_party.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: pip sees this venv's editable spendstream through the appended path and
    # must neither count it as installed nor touch it
    _run([root / "v" / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel],
         cwd=root)  # fmt: skip
    return root / "v"


def _outside_env() -> dict[str, str]:
    """This environment without anything that would point a child at the repository."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPENDSTREAM_") and k != "PYTHONPATH"}


def test_the_wheel_holds_the_schema_as_package_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert sorted(n.removeprefix("spendstream/schema/") for n in names if n.startswith("spendstream/schema/")) == SCHEMA
    assert SCHEMA


def test_the_installed_wheel_imports_from_the_venv_not_the_repository(venv: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib, spendstream.migrate as m\n"
        f"for name in {PACKAGES!r}:\n"
        "    print(importlib.import_module(name).__file__)\n"
        "print(m.SCHEMA_DIR)\n"
    )
    files = _run([venv / "bin" / "python", "-c", probe], cwd=tmp_path, env=_outside_env()).stdout.split()
    assert len(files) == len(PACKAGES) + 1
    for file in files:
        assert Path(file).is_relative_to(venv), file
        assert not Path(file).resolve().is_relative_to(REPO_ROOT), file
    assert sorted(p.name for p in Path(files[-1]).glob("*.sql")) == SCHEMA


def test_migrate_from_the_installed_wheel_applies_every_file(
    venv: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    database = settings.clickhouse.database
    env = {
        **_outside_env(),
        "SPENDSTREAM_CLICKHOUSE__URL": settings.clickhouse_url,
        "SPENDSTREAM_CLICKHOUSE__DATABASE": database,
    }
    result = _run([venv / "bin" / "spendstream", "migrate"], cwd=tmp_path, env=env)
    with get_client(settings, database="system") as client:
        try:
            applied = client.query(f"SELECT name FROM {database}.schema_migrations ORDER BY name").result_rows
            assert [name for (name,) in applied] == SCHEMA
        finally:
            for db in (database, f"{database}_tenant"):
                client.command(f"DROP DATABASE IF EXISTS {db}")
    assert all(f"applied {name}" in result.stdout for name in SCHEMA), result.stdout
