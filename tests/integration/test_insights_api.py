"""Forecast, recommendations and cost comparison against the embedded ClickHouse: events written
to ``usage_events`` (the materialized views fill the aggregates the planner reads), priced as the
pricing stage prices them, and every dollar checked against an independent computation."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from query_api_stack import EVENT_COLUMNS, admin_and_reader, insert_events, migrate  # tests/integration is on sys.path

from spendstream.pricing import default_catalog, price

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "i" * 24
TENANT = "tenant_insights"
OTHER = "tenant_insights_other"
NOW = datetime.now(UTC)
TODAY = NOW.replace(hour=0, minute=0, second=0, microsecond=0)


def event(i: int, ts: datetime, *, tenant: str = TENANT, agent: str, model: str, provider: str = "openai",
          input_tokens: int = 1000, output_tokens: int = 100, status: str = "ok", project: str = "p1",
          **tokens: int) -> dict[str, Any]:  # fmt: skip
    """One usage_events row priced by the catalog as the pricing stage prices it."""
    usage = {"provider": provider, "model": model, "input_tokens": input_tokens, "output_tokens": output_tokens,
             "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.000Z"), **tokens}  # fmt: skip
    line = price(usage, default_catalog())
    row = {
        "tenant": tenant, "project": project, "agent": agent, "user": "", "session_id": "", "operation": "chat",
        "tags": {}, "provider": provider, "model": model,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "reasoning_tokens": 0,
        "input_audio_tokens": 0, "output_audio_tokens": 0,
        "cost_nanos": line.cost_nanos, **{f"cost_{k}_nanos": v for k, v in line.cost.items()},
        "price_id": line.price_id, "pricing_status": line.pricing_status, "price_source": line.price_source,
        "status": status, "latency_ms": 800, "event_id": f"{tenant}-{agent}-{i}", "timestamp": ts,
        "received_at": ts, "partition": 0, "offset": i, "src_partition": 0, "src_offset": i,
    }  # fmt: skip
    row.update({k: v for k, v in tokens.items()})
    assert set(row) == set(EVENT_COLUMNS)
    return row


def weekly_history(days: int, agent: str, model: str, start_index: int, per_weekday: int = 6) -> list[dict]:
    """``days`` complete days before today: ``per_weekday`` calls on weekdays, 1 on weekends."""
    rng = random.Random(days)
    rows = []
    for d in range(days, 0, -1):
        day = TODAY - timedelta(days=d)
        calls = per_weekday if day.weekday() < 5 else 1
        for c in range(calls):
            ts = day + timedelta(hours=2 + c, minutes=rng.randrange(60))
            rows.append(event(start_index + len(rows), ts, agent=agent, model=model,
                              input_tokens=rng.randrange(800, 1200), output_tokens=rng.randrange(50, 150)))  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def api(make_settings):
    settings = make_settings(
        bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT, insights={"forecast_fit_days": 60}
    )
    migrate(settings)
    rows = weekly_history(60, "weekly-agent", "gpt-4o", 0)
    rows += weekly_history(4, "young-agent", "gpt-4o-mini", 10_000)
    rows += weekly_history(10, "tenday-agent", "gpt-4o-mini", 20_000)
    rows += weekly_history(20, "other-agent", "gpt-4o", 30_000)
    for r in weekly_history(30, "other-agent", "gpt-4o", 40_000):
        r["tenant"] = OTHER  # another tenant's spend never shows
        r["event_id"] = "x" + r["event_id"]
        rows.append(r)
    insert_events(settings, rows)
    with admin_and_reader(settings, ADMIN_KEY, TENANT) as (_, admin, reader):
        yield {"settings": settings, "admin": admin, "reader": reader, "rows": rows}


def usd(text: str) -> Decimal:
    assert isinstance(text, str) and len(text.split(".")[1]) == 9, text
    return Decimal(text)


def assert_nested(band: dict[str, str]) -> None:
    lo95, lo80, point = usd(band["lo_95_usd"]), usd(band["lo_80_usd"]), usd(band["point_usd"])
    hi80, hi95 = usd(band["hi_80_usd"]), usd(band["hi_95_usd"])
    assert Decimal(0) <= lo95 <= lo80 <= point <= hi80 <= hi95, band


def test_forecast_of_a_weekly_series(api):
    response = api["reader"].get("/v1/forecast", params={"horizon": 14, "agent": "weekly-agent"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["currency"] == "USD"
    assert body["method"] in ("AutoETS", "AutoTheta", "SeasonalNaive")
    assert body["history_days"] == 60
    assert set(body["backtest"]["mae_usd_per_day"]) == {"AutoETS", "AutoTheta", "SeasonalNaive"}
    assert len(body["series"]) == 14
    assert body["series"][0]["date"] == TODAY.date().isoformat()
    for day in body["series"]:
        assert_nested(day)
    assert_nested(body["total"])
    assert_nested(body["month_end"])
    # weekdays cost about six times a weekend day: the forecast keeps the pattern
    by_date = {datetime.fromisoformat(d["date"]).weekday(): usd(d["point_usd"]) for d in body["series"][:7]}
    assert min(by_date[w] for w in range(5)) > 2 * max(by_date[5], by_date[6])
    # the total's band is from simulated paths, not the sum of the daily bands
    daily_hi80 = sum(usd(d["hi_80_usd"]) for d in body["series"])
    assert usd(body["total"]["hi_80_usd"]) < daily_hi80
    # month to date is exact: the complete days of this month before today
    month_start = TODAY.replace(day=1)
    mtd = sum(r["cost_nanos"] for r in api["rows"]
              if r["tenant"] == TENANT and r["agent"] == "weekly-agent" and month_start <= r["timestamp"] < TODAY)  # fmt: skip
    assert usd(body["month_end"]["month_to_date_usd"]) == Decimal(mtd) / 10**9
    assert usd(body["month_end"]["point_usd"]) >= Decimal(mtd) / 10**9


def test_short_histories_fall_back(api):
    young = api["reader"].get("/v1/forecast", params={"agent": "young-agent"}).json()
    assert young["method"] == "run_rate" and young["history_days"] == 4
    assert_nested(young["total"])
    # wide: the 95 % band of the total spans more than half its point on each side
    point = usd(young["total"]["point_usd"])
    assert usd(young["total"]["hi_95_usd"]) - usd(young["total"]["lo_95_usd"]) > point
    ten = api["reader"].get("/v1/forecast", params={"agent": "tenday-agent", "horizon": 7}).json()
    assert ten["method"] in ("AutoETS", "AutoTheta") and ten["history_days"] == 10
    assert "SeasonalNaive" not in ten.get("backtest", {}).get("mae_usd_per_day", {})


def test_forecast_by_agent_top_n_and_cache(api):
    params = {"by": "agent", "limit": 2, "horizon": 7}
    first = api["reader"].get("/v1/forecast", params=params)
    assert first.status_code == 200, first.text
    body = first.json()
    assert [g["key"] for g in body["groups"]] == ["weekly-agent", "other-agent"]  # the two most expensive
    for group in body["groups"]:
        assert len(group["series"]) == 7
        assert_nested(group["total"])
        assert_nested(group["month_end"])
    assert body["cached"] is False
    again = api["reader"].get("/v1/forecast", params=params).json()
    assert again["cached"] is True and again["groups"] == body["groups"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"horizon": 0}, "horizon"),
        ({"horizon": 1000}, "horizon"),
        ({"level": "80,abc"}, "level"),
        ({"level": "101"}, "level"),
        ({"granularity": "hour"}, "granularity"),
        ({"by": "session"}, "by"),
        ({"by": "agent", "limit": 100_000}, "limit"),
        ({"tz": "Mars/Olympus"}, "tz"),
        ({"tag": "novalue"}, "tag"),
    ],
)
def test_forecast_bad_input_is_422_naming_the_field(api, params, field):
    response = api["reader"].get("/v1/forecast", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
