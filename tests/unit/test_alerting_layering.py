"""Alerting is a domain core (spendstream/alerting), not the notify stage's: the query API sends
its test alerts without importing the stage, so none of the stage's Prometheus metrics appear in
a registry the query API never exports. Each check runs in a fresh interpreter: a test that ran
before in this session may have imported the stage already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

QUERY_API = """
import json, sys
from prometheus_client import REGISTRY
from query_api.app import create_app
from spendstream.settings import Settings

app = create_app(Settings())
print(json.dumps({
    "default": sorted(m.name for m in REGISTRY.collect()),
    "exported": sorted(m.name for m in app.state.metrics.registry.collect()),
    "modules": sorted(sys.modules),
}))
"""

CORE = """
import json, sys
import spendstream.alerting
print(json.dumps({"modules": sorted(sys.modules)}))
"""


def run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_query_api_registers_no_notify_metric_and_imports_no_stage():
    seen = run(QUERY_API)
    assert "query_api.routers.webhooks" in seen["modules"] and "spendstream.alerting.sender" in seen["modules"]
    assert [m for m in seen["default"] + seen["exported"] if m.startswith("spendstream_notify")] == []
    assert [m for m in seen["modules"] if m.split(".")[0] == "stream_processors"] == []


def test_the_alerting_core_imports_no_service():
    modules = run(CORE)["modules"]
    services = ("stream_processors", "query_api", "ingest_gateway")
    assert [m for m in modules if m.split(".")[0] in services] == []
