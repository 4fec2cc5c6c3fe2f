"""Every HTTP endpoint of the gateway and the query API is documented (README.md, docs/, a
service's README): its method and path, or its last segment in a row that names its parent path
(``/timeseries`` in the ``GET /v1/analytics/overview, /timeseries, ...`` row)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ingest_gateway.app import create_app as gateway_app
from query_api.app import create_app as query_app
from spendstream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("*/README.md"))]
#: a path parameter as the docs write it: {name}, <name>, :name or an example value
PARAM = r"(?:\{[^}]*\}|<[^>]*>|:[a-z_]+|[A-Za-z0-9_.-]+)"


def _pattern(path: str) -> str:
    return "".join(PARAM if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]*\})", path))


def documented(method: str, path: str, docs: list[str]) -> bool:
    full = _pattern(path) + r"(?![\w/])"
    parent, _, last = path.rpartition("/")
    tail = r"`/" + _pattern(last) + r"[`?]"
    for line in docs:
        if re.search(full, line) and (method in line or "`" + path in line or re.search(r"`" + full, line)):
            return True
        if parent and re.search(tail, line) and re.search(method + r"[^\n]*" + _pattern(parent), line):
            return True
    return False


@pytest.mark.parametrize("make_app", [gateway_app, query_app], ids=["gateway", "query_api"])
def test_every_endpoint_is_documented(make_app):
    docs = [line for f in DOC_FILES for line in f.read_text().splitlines()]
    schema = make_app(Settings()).openapi()["paths"]
    assert len(schema) >= 8
    missing = [
        f"{method.upper()} {path}"
        for path, operations in schema.items()
        for method in operations
        if not documented(method.upper(), path, docs)
    ]
    assert not missing, f"endpoints without docs: {missing}"


def test_the_check_finds_an_undocumented_endpoint():
    docs = ["| `GET /v1/analytics/overview`, `/timeseries?granularity=day` | filters |"]
    assert documented("GET", "/v1/analytics/timeseries", docs)
    assert not documented("GET", "/v1/analytics/breakdown", docs)
    assert not documented("DELETE", "/v1/keys/{key_id}", docs)
    assert documented("DELETE", "/v1/keys/{key_id}", ["`DELETE /v1/keys/{id}` revokes a key"])
