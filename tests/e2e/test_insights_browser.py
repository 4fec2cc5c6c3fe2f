"""The dashboard's forecast panel and recommendations list in headless Chromium against a running
query API with seeded usage: the bands are drawn, the month-end projection and the savings are the
API's exact figures."""

from __future__ import annotations

import os
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from query_api_stack import QueryApiServer, insert_events, migrate  # noqa: E402
from test_insights_api import event  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.clickhouse,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (make browser-deps installs it)"),
]
ADMIN_KEY = "ss_browser_admin_" + "f" * 24
TENANT = "tenant_insights"  # the tenant event() writes


@pytest.fixture(scope="module")
def server(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = []
    rng = random.Random(5)
    for d in range(45, 0, -1):  # weekly pattern on gpt-4o with short outputs (a downgrade), some errors
        day = today - timedelta(days=d)
        for c in range(8 if day.weekday() < 5 else 2):
            rows.append(event(len(rows), day + timedelta(hours=1 + c), agent="triage", model="gpt-4o",
                              input_tokens=rng.randrange(1000, 5000), output_tokens=120, status="error" if c == 7 else "ok"))  # fmt: skip
    insert_events(settings, rows)
    with QueryApiServer(settings) as running:
        yield running


def test_forecast_panel_and_recommendations_render(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with server.client(ADMIN_KEY) as client:
        tz = "UTC"
        forecast = client.get("/v1/forecast", params={"horizon": 30, "tz": tz}).json()
        recs = client.get("/v1/recommendations", params={"limit": 20}).json()["recommendations"]
    assert {r["type"] for r in recs} == {"model_downgrade", "error_waste"}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400}, timezone_id=tz)
            page.goto(server.url + "/")
            page.fill("#api-key", ADMIN_KEY)
            page.click("#key-form button[type=submit]")
            page.wait_for_selector("body[data-loaded]", timeout=60_000)
            page.wait_for_selector("#forecast-panel:not([hidden]) #forecast-chart polygon.band95")
            assert page.locator("#forecast-chart polygon.band80").count() == 1
            dots = page.eval_on_selector_all(
                "#forecast-chart circle.point", "els => els.map(e => Number(e.dataset.value))"
            )
            assert dots == [float(d["point_usd"]) for d in forecast["series"]]
            assert page.get_attribute("#month-end-point", "title") == f"{forecast['month_end']['point_usd']} USD"
            assert page.get_attribute("#forecast-total", "title") == f"{forecast['total']['point_usd']} USD"
            assert forecast["method"] in page.text_content("#forecast-note")

            page.wait_for_selector("#recommendations-panel:not([hidden]) #recommendations tbody tr")
            savings = page.eval_on_selector_all(
                "#recommendations tbody td:nth-child(5)", "els => els.map(e => e.title)"
            )
            assert savings == [f"{r['estimated_savings_monthly']} USD" for r in recs]
            agents = page.eval_on_selector_all(
                "#recommendations tbody td:nth-child(3)", "els => els.map(e => e.textContent)"
            )
            assert agents == ["triage"] * len(recs)
            page.screenshot(path="/tmp/spendstream-insights.png", full_page=True)
        finally:
            browser.close()
