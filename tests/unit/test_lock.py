"""Installs come from the lock: every package pinned exactly with hashes, every install path uses it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
MAIN_LOCK = ROOT / "requirements" / "main.txt"
DEV_LOCK = ROOT / "requirements" / "dev.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(lock: Path) -> dict[str, str]:
    """name -> version of every requirement in a pip-compile lock, checking each is pinned and hashed."""
    text = lock.read_text()
    found: dict[str, str] = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = entry.split("\\", 1)[0].strip()
        if not first or first.startswith(("#", "-")):
            continue
        req = Requirement(first)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{lock.name}: {first} is not pinned exactly"
        assert "--hash=sha256:" in entry, f"{lock.name}: {first} has no hash"
        found[canonicalize_name(req.name)] = spec.version
    return found


def declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_every_runtime_dependency_is_pinned_with_a_hash_in_the_main_lock():
    locked = pins(MAIN_LOCK)
    assert declared(PYPROJECT["project"]["dependencies"]) <= locked.keys()
    # the build backend too: installing spendstream itself resolves nothing
    assert {"setuptools", "wheel"} <= locked.keys()


def test_dev_lock_holds_the_main_lock_at_the_same_versions_plus_the_dev_tools():
    main, dev = pins(MAIN_LOCK), pins(DEV_LOCK)
    assert {name: dev.get(name) for name in main} == main
    assert declared(PYPROJECT["project"]["optional-dependencies"]["dev"]) <= dev.keys()


def test_make_install_uses_only_the_lock_and_resolves_nothing():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    installs = [line.strip() for line in recipe.splitlines() if "pip install" in line]
    assert installs, recipe
    for line in installs:
        assert "--require-hashes -r $(LOCK)" in line or "--no-deps --no-build-isolation" in line, line
    assert "LOCK := requirements/dev.txt" in makefile
    # make test and make dev go through that recipe; CI runs make test
    assert re.search(r"^test: install", makefile, re.M) and re.search(r"^dev: install", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_image_installs_from_the_main_lock_with_hashes():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "COPY requirements/main.txt" in dockerfile
    for line in dockerfile.splitlines():
        if re.search(r"\bpip (install|wheel)\b", line) and "-r " in line:
            assert "--require-hashes" in line, line
    assert "!requirements/main.txt" in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
