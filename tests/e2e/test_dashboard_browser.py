"""The dashboard in headless Chromium (Debian package) against a running query API with seeded data:
charts render from the API's figures, a filter narrows them, and the screenshot is not blank."""

from __future__ import annotations

import base64
import os
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from query_api_stack import QueryApiServer, insert_events, make_events, migrate  # noqa: E402

from spendstream.budgets.store import insert_alerts  # noqa: E402
from spendstream.clickhouse import get_client  # noqa: E402
from spendstream.money import format_usd  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.clickhouse,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (make browser-deps installs it)"),
]
ADMIN_KEY = "ss_browser_admin_" + "z" * 24
SCREENSHOT_DIR = Path(os.environ.get("SPENDSTREAM_SCREENSHOT_DIR", "/tmp"))


@pytest.fixture(scope="module")
def dashboard(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant="acme")
    migrate(settings)
    now = datetime.now(UTC)
    events = make_events("acme", 1500, now - timedelta(days=6), now - timedelta(minutes=1), seed=21)
    insert_events(settings, events)
    seed_alerts(settings, now)
    seed_provider_costs(settings, now)
    seed_repricings(settings)
    with QueryApiServer(settings) as server:
        if os.path.exists(Path(__file__).resolve().parents[2] / "query_api" / "routers" / "budgets.py"):
            with server.client(ADMIN_KEY) as admin:
                created = admin.post(
                    "/v1/budgets",
                    json={
                        "name": "fleet total",
                        "scope": {},
                        "window": "total",
                        "limit_usd": "100.00",
                        "thresholds": [50, 80, 100],
                    },
                )
                assert created.status_code == 201, created.text
        yield server, events


ALERT_COLUMNS = ["tenant", "alert_id", "kind", "budget_id", "budget_name", "scope", "window_start", "window_end",
                 "threshold", "spent_nanos", "limit_nanos", "percent_used", "projected_nanos", "projected_at",
                 "event_id", "top", "fired_at"]  # fmt: skip


def seed_alerts(settings, now: datetime) -> None:
    """A threshold alert and a forecast alert (which has no threshold, only a projection)."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    rows = [
        ["acme", "al_threshold", "threshold", "bud_1", "fleet daily", {}, day, day + timedelta(days=1), Decimal(80),
         8_000_000_000, 10_000_000_000, Decimal("80"), None, None, "ev_1", "[]", now - timedelta(minutes=5)],
        ["acme", "al_forecast", "forecast", "bud_1", "fleet daily", {}, day, day + timedelta(days=1), Decimal(0),
         6_000_000_000, 10_000_000_000, Decimal("60"), 12_400_000_000, day + timedelta(hours=20), "ev_2", "[]",
         now - timedelta(minutes=10)],
    ]  # fmt: skip
    client = get_client(settings)
    try:
        client.insert("budget_alerts", rows, column_names=ALERT_COLUMNS)
        insert_alerts(client, [anomaly_alert(now)])
    finally:
        client.close()


def anomaly_alert(now: datetime) -> dict:
    """An anomaly alert (the anomaly stage's value): agent acme-agent-1 at 20x, a volume spike."""
    from spendstream.anomaly.alerts import anomaly_alert_value
    from spendstream.anomaly.detector import Anomaly, ModelExcess, anomaly_alert_id

    start = int((now - timedelta(minutes=30)).timestamp()) // 60 * 60_000
    a = Anomaly(
        tenant="acme", project="acme-project-0", agent="acme-agent-1",
        alert_id=anomaly_alert_id("acme", "acme-project-0", "acme-agent-1", start), episode_start_ms=start,
        minute_ms=start + 60_000, window_start_ms=start - 480_000, window_end_ms=start + 120_000,
        window_nanos=490_000_000, usual_window_nanos=100_000_000, ratio=4.9, score=250.0, excess_nanos=390_000_000,
        minute_nanos=200_000_000, usual_minute_nanos=10_000_000, episode_nanos=400_000_000,
        usual_episode_nanos=20_000_000, episode_ratio=20.0, spike_type="volume", calls=400, usual_calls=20.0,
        calls_ratio=20.0, tokens_per_call=1000.0, usual_tokens_per_call=1000.0, size_ratio=1.0,
        nanos_per_token=1.0, usual_nanos_per_token=1.0, price_ratio=1.0,
        models=(ModelExcess("openai/gpt-4o", 400_000_000, 20_000_000, 380_000_000, 1.0),), event_ids=("ev_9",),
        seasonality="hour_of_day", baseline_samples=420, extreme=True,
    )  # fmt: skip
    return anomaly_alert_value(a, (), int((now - timedelta(minutes=20)).timestamp() * 1000))


def seed_provider_costs(settings, now: datetime) -> None:
    """A live Anthropic connection whose cost report says $3 yesterday (the reconciliation panel)."""
    yesterday = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    client = get_client(settings)
    try:
        client.insert(
            "provider_connections",
            [["acme", "pc_dash", "anthropic", "org", "00", 30, Decimal(5), 10**9, [], now, 0, 1]],
            column_names=["tenant", "id", "provider", "name", "ciphertext", "backfill_days", "drift_threshold_pct",
                          "drift_threshold_nanos", "channels", "created_at", "deleted", "version"],
        )  # fmt: skip
        client.insert(
            "provider_costs_daily",
            [["acme", "pc_dash", "anthropic", yesterday, yesterday + timedelta(days=1), 0, "m-large", 3 * 10**9, now, 1]],
            column_names=["tenant", "connection_id", "provider", "bucket_start", "bucket_end", "row_index", "model",
                          "amount_nanos", "collected_at", "version"],
        )  # fmt: skip
    finally:
        client.close()


#: re-pricing audit rows (spendstream.repricing.store.audit): one job applied, one proposed
REPRICINGS = [
    ("rp1", "key-finance", "late discount", {"from": "2026-03-01T00:00:00.000Z", "to": "2026-03-04T00:00:00.000Z",
     "model": "mystery-1"}, 62, 0, 1_234_567_890, ("started", "done")),
    ("rp2", "auto:catalog", "catalog update genai-prices 1 -> 2: openai/gpt-4o",
     {"from": "2026-03-02T00:00:00.000Z", "to": "2026-03-05T00:00:00.000Z"}, 7, 2_500_000_000, 3_000_000_000,
     ("proposed",)),
]  # fmt: skip


def seed_repricings(settings) -> None:
    import time

    from spendstream.repricing import store

    client = get_client(settings)
    try:
        for job_id, actor, reason, scope, changed, old, new, statuses in REPRICINGS:
            diff = {"events_changed": changed, "old_nanos": old, "new_nanos": new}
            job = store.Job("acme", job_id, actor, reason, scope, diff=diff)
            for status in statuses:
                store.audit(client, job, status)
                time.sleep(0.01)  # distinct, ordered audit times
    finally:
        client.close()


def test_dashboard_renders_filters_and_screenshots(dashboard, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    server, events = dashboard
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            external = []
            page.on("request", lambda r: external.append(r.url) if not r.url.startswith(server.url) else None)
            page.goto(server.url + "/")
            page.fill("#api-key", ADMIN_KEY)
            page.click("#key-form button[type=submit]")
            page.wait_for_selector("body[data-loaded]")
            page.wait_for_function("document.querySelectorAll('#spend-chart rect.bar').length > 0")

            total = sum(e["cost_nanos"] for e in events)
            assert page.get_attribute('[data-field="cost"]', "title") == f"{total / 1e9:.9f} USD"
            bars = page.eval_on_selector_all("#spend-chart rect.bar", "els => els.map(e => Number(e.dataset.value))")
            assert sum(v > 0 for v in bars) >= 6 and sum(bars) == pytest.approx(total / 1e9, rel=1e-9)
            agents = page.eval_on_selector_all("#by-agent li .name", "els => els.map(e => e.textContent)")
            assert sorted(agents) == sorted({e["agent"] for e in events})
            assert page.locator("#by-model li").count() == len({e["model"] for e in events})
            unpriced = page.eval_on_selector_all(
                "#unpriced tbody td:nth-child(2)", "els => els.map(e => e.textContent)"
            )
            assert set(unpriced) == {"mystery-model"}
            # budgets are served by another module; when present, the budget shows its burn
            if page.locator("#budgets-panel").is_visible():
                page.wait_for_selector("#budgets .budget .burn-fill")
                width = page.eval_on_selector("#budgets .burn-fill", "e => parseFloat(e.style.width)")
                assert width == pytest.approx(100 * total / 1e9 / 100.0, abs=0.01)  # percent_used has 2 decimals

            page.wait_for_selector("#alerts tbody tr")
            levels = page.eval_on_selector_all("#alerts tbody td:nth-child(4)", "els => els.map(e => e.textContent)")
            assert levels == ["80 %", "projected $12.400000000", "20x volume"]
            # the anomaly: listed with its explanation, and marked on the spend chart
            row = page.eval_on_selector_all("#anomalies tbody td", "els => els.map(e => e.textContent)")
            assert row[1:5] == ["acme-project-0 / acme-agent-1", "20x", "$0.490000000 / $0.100000000",
                                "volume: 400 calls, 20x the usual; openai/gpt-4o 100% of the excess"]  # fmt: skip
            assert page.locator("#spend-chart rect.bar.anomaly").count() == 1
            assert page.locator("#spend-chart .anomaly-mark").count() == 1

            # re-pricings: one row per job (its newest audit entry), newest first, exact totals in the title
            page.wait_for_selector("#repricings tbody tr")
            rows = page.eval_on_selector_all(
                "#repricings tbody tr", "trs => trs.map(tr => [...tr.children].map(td => td.textContent))"
            )
            assert [r[1:3] + r[7:] for r in rows] == [
                [actor, reason, statuses[-1]] for _, actor, reason, *_, statuses in reversed(REPRICINGS)
            ]
            assert rows[1][3] == "2026-03-01 – 2026-03-04, model mystery-1" and rows[1][4] == "62"
            assert rows[1][5:7] == ["$0", "$1.23"] and rows[0][5:7] == ["$2.50", "$3.00"]
            assert page.get_attribute("#repricings tr[data-job=rp1] td:nth-child(7)", "title") == "1234567890 nano-USD"

            # reconciliation: yesterday's Anthropic spend, tracked (the events) vs reported ($3)
            page.wait_for_selector("#reconciliation tbody tr")
            yesterday = (datetime.now(UTC) - timedelta(days=1)).date()
            tracked = sum(e["cost_nanos"] for e in events
                          if e["provider"] == "anthropic" and e["timestamp"].date() == yesterday)  # fmt: skip
            rows = page.eval_on_selector_all(
                "#reconciliation tbody tr", "trs => trs.map(tr => [...tr.children].map(td => td.textContent))"
            )
            row = next(r for r in rows if r[0] == yesterday.isoformat() and r[1] == "anthropic")
            assert row[2:5] == [f"${format_usd(tracked)}", "$3", f"${format_usd(3 * 10**9 - tracked)}"]

            loaded = page.get_attribute("body", "data-loaded")
            page.select_option("select[name=agent]", "acme-agent-2")
            page.wait_for_function(f"document.body.dataset.loaded !== '{loaded}'")
            filtered = sum(e["cost_nanos"] for e in events if e["agent"] == "acme-agent-2")
            page.wait_for_function(
                "want => document.querySelector('[data-field=cost]').title === want", arg=f"{filtered / 1e9:.9f} USD"
            )
            assert page.eval_on_selector_all("#by-agent li .name", "els => els.map(e => e.textContent)") == [
                "acme-agent-2"
            ]
            assert page.evaluate("sessionStorage.getItem('spendstream.apiKey')") == ADMIN_KEY
            assert external == [], f"the dashboard loaded something from elsewhere: {external}"

            shot = SCREENSHOT_DIR / "spendstream-dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            stats = pixel_stats(browser.new_page(), shot)
        finally:
            browser.close()
    assert stats["width"] >= 1000 and stats["height"] >= 600
    assert stats["colours"] > 20, stats
    assert stats["top_share"] < 0.9, f"one colour covers almost the whole screenshot: {stats}"


def pixel_stats(page, path: Path) -> dict:
    """Decode the PNG in the browser itself; count colours and the share of the commonest one."""
    src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return page.evaluate(
        """async (src) => {
            const img = new Image();
            img.src = src;
            await img.decode();
            const canvas = document.createElement("canvas");
            canvas.width = img.width;
            canvas.height = img.height;
            const ctx = canvas.getContext("2d");
            ctx.drawImage(img, 0, 0);
            const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            const counts = new Map();
            let n = 0;
            for (let i = 0; i < d.length; i += 4 * 7) {
                const k = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
                counts.set(k, (counts.get(k) || 0) + 1);
                n++;
            }
            const top = Math.max(...counts.values());
            return {width: canvas.width, height: canvas.height, colours: counts.size, top_share: top / n};
        }""",
        src,
    )
