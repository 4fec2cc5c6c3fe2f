"""Forecast, recommendations and cost comparison against the embedded ClickHouse: events written
to ``usage_events`` (the materialized views fill the aggregates the planner reads), priced as the
pricing stage prices them, and every dollar checked against an independent computation."""

from __future__ import annotations

import csv
import io
import json
import random
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from genai_prices import types as gp
from genai_prices.data import providers
from query_api_stack import EVENT_COLUMNS, admin_and_reader, insert_events, migrate  # tests/integration is on sys.path

from spendstream.pricing import default_catalog, load_catalog, price

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
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT, insights={"forecast_fit_days": 60})
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
    with admin_and_reader(settings, ADMIN_KEY, TENANT) as (server, admin, reader):
        yield {"settings": settings, "admin": admin, "reader": reader, "rows": rows, "server": server}


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


# ---------------------------------------------------------------- recommendations and comparison
RECENT = NOW - timedelta(days=12)


def calc_nanos(row: dict[str, Any], provider: str, model: str) -> int:
    """genai-prices' own price of the event's usage on (provider, model), to the nano-USD."""
    usage = Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"],
                  cache_read_tokens=row["cache_read_tokens"], cache_write_tokens=row["cache_write_tokens"])  # fmt: skip
    total = calc_price(usage, model, provider_id=provider, genai_request_timestamp=row["timestamp"]).total_price
    return int((total * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def seed_recommendations() -> list[dict]:
    rng = random.Random(7)
    rows = []

    def add(agent, model, provider, ts, **kw):
        rows.append(event(100_000 + len(rows), ts, agent=agent, model=model, provider=provider, project="recs", **kw))

    for i in range(40):  # short outputs on gpt-4o: downgrade to gpt-4o-mini; 5 failing calls
        add("downgrade-agent", "gpt-4o", "openai", RECENT + timedelta(hours=i * 5, minutes=rng.randrange(60)),
            input_tokens=rng.randrange(2000, 3000), output_tokens=rng.randrange(100, 200),
            status="error" if i % 8 == 0 else "ok")  # fmt: skip
    for i in range(10):  # just over gemini-2.5-pro's 200k tier, long outputs (no downgrade)
        add("longctx-agent", "gemini-2.5-pro", "google", RECENT + timedelta(hours=i * 7),
            input_tokens=200_001 + rng.randrange(15_000), output_tokens=600 + i)  # fmt: skip
    burst = RECENT + timedelta(days=3, hours=4)
    for i in range(120):  # one burst of 120 calls within two hours
        add("batch-agent", "claude-haiku-4-5", "anthropic", burst + timedelta(seconds=i * 50),
            input_tokens=rng.randrange(300, 600), output_tokens=rng.randrange(600, 900))  # fmt: skip
    for day in range(10):  # large, steady input without cache reads, long outputs
        for hour in range(14):
            add("cache-agent", "claude-sonnet-4-5", "anthropic", RECENT + timedelta(days=day, hours=hour),
                input_tokens=5000 + rng.randrange(500), output_tokens=800)  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def recs(api):
    rows = seed_recommendations()
    insert_events(api["settings"], rows)
    return rows


def of(rows, agent, status=None):
    return [r for r in rows if r["agent"] == agent and (status is None or r["status"] == status)]


def one(items, kind, agent):
    found = [i for i in items if i["type"] == kind and i["agent"] == agent]
    assert len(found) == 1, [(i["type"], i["agent"]) for i in items]
    return found[0]


def test_recommendation_savings_equal_an_independent_repricing(api, recs):
    response = api["reader"].get("/v1/recommendations", params={"project": "recs"})
    assert response.status_code == 200, response.text
    items = response.json()["recommendations"]
    for item in items:
        assert set(item) >= {"type", "title", "description", "agent", "project", "estimated_savings_monthly",
                             "estimated_savings_percent", "priority", "action_items", "evidence", "confidence"}  # fmt: skip
        assert item["priority"] in ("high", "medium", "low")
        usd(item["estimated_savings_monthly"])

    ok = of(recs, "downgrade-agent", "ok")
    down = one(items, "model_downgrade", "downgrade-agent")
    expected = sum(r["cost_nanos"] for r in ok) - sum(calc_nanos(r, "openai", "gpt-4o-mini") for r in ok)
    assert down["estimated_savings_monthly_nanos"] == expected > 0
    assert down["evidence"]["alternative"]["model"] == "gpt-4o-mini"
    waste = one(items, "error_waste", "downgrade-agent")
    assert waste["estimated_savings_monthly_nanos"] == sum(
        r["cost_nanos"] for r in of(recs, "downgrade-agent", "error")
    )

    # every call of longctx-agent paid the >200k tier: one tier lower is the base price of all tokens
    pro = next(m for p in providers if p.id == "google" for m in p.models if m.id == "gemini-2.5-pro").prices
    base_in, base_out = pro.input_mtok.base, pro.output_mtok.base
    lower = sum(
        int(
            ((r["input_tokens"] * base_in + r["output_tokens"] * base_out) * 1000).quantize(Decimal(1), ROUND_HALF_EVEN)
        )
        for r in of(recs, "longctx-agent")
    )
    tier = one(items, "long_context_tier", "longctx-agent")
    assert tier["estimated_savings_monthly_nanos"] == sum(r["cost_nanos"] for r in of(recs, "longctx-agent")) - lower

    batch = one(items, "batch_api", "batch-agent")
    total = sum(r["cost_nanos"] for r in of(recs, "batch-agent"))
    assert batch["estimated_savings_monthly_nanos"] == int((Decimal(total) / 2).quantize(Decimal(1), ROUND_HALF_EVEN))
    assert batch["estimated_savings_percent"] == 50.0

    sonnet = next(m for p in providers if p.id == "anthropic" for m in p.models if m.id == "claude-sonnet-4-5").prices
    # the base tier: every call is far below the 200k threshold
    rate_in, rate_read, rate_write = (getattr(p, "base", p) for p in (sonnet.input_mtok, sonnet.cache_read_mtok,
                                                                      sonnet.cache_write_mtok))  # fmt: skip
    plain = sum(r["input_tokens"] for r in of(recs, "cache-agent"))
    estimate = Decimal(plain) / 2 * (Decimal("0.9") * (rate_in - rate_read) - Decimal("0.1") * (rate_write - rate_in))
    caching = one(items, "prompt_caching", "cache-agent")
    assert caching["estimated_savings_monthly_nanos"] == int((estimate * 1000).quantize(Decimal(1), ROUND_HALF_EVEN))
    assert caching["evidence"]["assumptions"]["cache_reads_per_write"] == 9

    # the same dollars are never counted twice for one agent: one kind per agent's successful calls
    kinds = {(i["agent"], i["type"]) for i in items if i["type"] != "error_waste"}
    assert len(kinds) == len({a for a, _ in kinds})

    summary = api["reader"].get("/v1/recommendations/summary", params={"project": "recs"}).json()
    assert summary["count"] == len(items)
    assert usd(summary["total_estimated_savings_monthly"]) == sum(usd(i["estimated_savings_monthly"]) for i in items)
    assert summary["by_type"]["model_downgrade"]["count"] == 1


def test_cost_comparison_reprices_exactly(api, recs):
    response = api["reader"].get(
        "/v1/analytics/cost-comparison", params={"agent": "downgrade-agent", "models": "gpt-4o-mini,gpt-4.1,gpt-4o"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    rows = of(recs, "downgrade-agent")
    current = sum(r["cost_nanos"] for r in rows)
    assert body["label"] == "price only"
    assert body["current"] == {"provider": "openai", "model": "gpt-4o", "cost_usd": usd_text(current)}
    by_model = {m["model"]: m for m in body["models"]}
    for target in ("gpt-4o-mini", "gpt-4.1", "gpt-4o"):
        expected = sum(calc_nanos(r, "openai", target) for r in rows)
        assert by_model[target]["cost_usd"] == usd_text(expected)
        assert by_model[target]["difference_usd"] == usd_text(expected - current)
        assert by_model[target]["fits_context"] is True
    assert by_model["gpt-4o"]["difference_usd"] == "0.000000000"  # re-priced on itself: as charged

    default = api["reader"].get("/v1/analytics/cost-comparison", params={"agent": "downgrade-agent"}).json()
    assert {"gpt-4o-mini", "gpt-4.1"} <= {m["model"] for m in default["models"]}
    assert all(m["provider"] == "openai" for m in default["models"])

    several = api["reader"].get("/v1/analytics/cost-comparison", params={"project": "recs", "models": "gpt-4o-mini"})
    assert len(several.json()["current_models"]) == 4 and "current" not in several.json()

    bad = api["reader"].get("/v1/analytics/cost-comparison", params={"models": "no-such-model-xyz"})
    assert bad.status_code == 422 and bad.json()["field"] == "models"


def usd_text(nanos: int) -> str:
    whole, frac = divmod(abs(nanos), 10**9)
    return f"{'-' if nanos < 0 else ''}{whole}.{frac:09d}"


# ---------------------------------------------------------------- a price change inside the history
def test_forecast_reprices_history_across_a_catalog_price_change(api):
    change = (TODAY - timedelta(days=10)).date()
    old = gp.ModelPrice(input_mtok=Decimal("4"), output_mtok=Decimal("16"))
    new = gp.ModelPrice(input_mtok=Decimal("1"), output_mtok=Decimal("4"))
    house = gp.ModelInfo(
        id="house-1", match=gp.ClauseEquals(equals="house-1"), context_window=100_000,
        prices=[gp.ConditionalPrice(prices=old), gp.ConditionalPrice(gp.StartDateConstraint(change), prices=new)],
    )  # fmt: skip
    catalog = load_catalog([*providers, gp.Provider(id="acme", name="Acme", api_pattern="x", models=[house])])
    app = api["server"]._server.config.app
    saved, app.state.catalog = app.state.catalog, catalog
    try:
        rows = []
        for d in range(30, 0, -1):  # the same usage every day: 10 calls of 1M input + 100k output tokens
            day = TODAY - timedelta(days=d)
            for c in range(10):
                ts = day + timedelta(hours=c)
                usage = {"provider": "acme", "model": "house-1", "input_tokens": 1_000_000, "output_tokens": 100_000,
                         "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")}  # fmt: skip
                row = event(200_000 + len(rows), ts, agent="house-agent", model="house-1", provider="acme",
                            input_tokens=1_000_000, output_tokens=100_000)  # fmt: skip
                line = price(usage, catalog)
                row |= {"cost_nanos": line.cost_nanos, **{f"cost_{k}_nanos": v for k, v in line.cost.items()}}
                rows.append(row)
        insert_events(api["settings"], rows)
        body = api["reader"].get("/v1/forecast", params={"agent": "house-agent", "horizon": 7}).json()
    finally:
        app.state.catalog = saved
    old_day, new_day = 10 * (4 + 1.6) * 10**9, 10 * (1 + 0.4) * 10**9  # 56 USD a day before, 14 after
    days_before = 20
    (repriced,) = body["prices"]["repriced"]
    assert (repriced["provider"], repriced["model"], repriced["days"]) == ("acme", "house-1", days_before)
    assert repriced["delta_usd"] == usd_text(int(days_before * (new_day - old_day)))
    # at today's price every day of the history costs 14 USD: so does every forecast day
    for day in body["series"]:
        assert usd(day["point_usd"]) == Decimal(14), day


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/recommendations", {"type": "free_money"}, "type"),
        ("/v1/recommendations", {"priority": "urgent"}, "priority"),
        ("/v1/recommendations", {"limit": 0}, "limit"),
        ("/v1/recommendations", {"tag": "novalue"}, "tag"),
        ("/v1/recommendations/summary", {"tag": "a:b", "project": "x", "user": "u", "model": "m"}, None),
        ("/v1/analytics/cost-comparison", {"models": ""}, "models"),
        ("/v1/analytics/cost-comparison", {"models": ",".join(["gpt-4o"] * 61)}, "models"),
        ("/v1/analytics/cost-comparison", {"models": "x" * 5000}, "models"),
        ("/v1/analytics/cost-comparison", {"tag": ":"}, "tag"),
    ],
)
def test_insights_bad_input_is_422_naming_the_field(api, path, params, field):
    response = api["reader"].get(path, params=params)
    if field is None:  # valid, matching nothing: an empty answer
        assert response.status_code == 200, response.text
        assert response.json()["count"] == 0
        return
    assert response.status_code == 422, response.text
    assert response.json()["field"].split(".")[0] == field  # a repeated parameter's item: type.0


def test_other_tenants_usage_never_shows(api, recs):
    items = api["reader"].get("/v1/recommendations").json()["recommendations"]
    assert items and all(not i["agent"].startswith("x") for i in items)
    forecast = api["reader"].get("/v1/forecast", params={"by": "agent", "limit": 50, "horizon": 3}).json()
    # other-agent's own history here is 20 days; the other tenant's 30 days do not add to it
    other = next(g for g in forecast["groups"] if g["key"] == "other-agent")
    assert other["history_days"] == 20


def test_trends_week_over_week_and_month_over_month(api):
    agents = ["weekly-agent", "young-agent", "other-agent"]
    response = api["reader"].get("/v1/analytics/trends", params={"by": "agent", "agent": agents, "limit": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    now = datetime.fromisoformat(body["as_of"])
    mine = [r for r in api["rows"] if r["tenant"] == TENANT and r["agent"] in agents]
    for name, days in (("week", 7), ("month", 30)):
        period = body["periods"][name]

        def sums(start, end, agent=None):
            chosen = [r for r in mine if start <= r["timestamp"] < end and (agent is None or r["agent"] == agent)]
            return sum(r["cost_nanos"] for r in chosen), len(chosen)

        current = sums(now - timedelta(days=days), now)
        previous = sums(now - timedelta(days=2 * days), now - timedelta(days=days))
        assert period["current"]["cost_usd"] == usd_text(current[0]) and period["current"]["calls"] == current[1]
        assert period["previous"]["cost_usd"] == usd_text(previous[0])
        assert period["change"]["cost_usd"] == usd_text(current[0] - previous[0])
        changes = [abs(usd(m["change"]["cost_usd"])) for m in period["movers"]]
        assert changes == sorted(changes, reverse=True)
        young = next(m for m in period["movers"] if m["key"] == "young-agent")
        assert young["previous"]["calls"] == 0 and young["change"]["cost_percent"] is None  # new this period
        weekly_now = sums(now - timedelta(days=days), now, "weekly-agent")
        weekly = next(m for m in period["movers"] if m["key"] == "weekly-agent")
        assert weekly["current"]["cost_usd"] == usd_text(weekly_now[0])
    bad = api["reader"].get("/v1/analytics/trends", params={"by": "session"})
    assert bad.status_code == 422 and bad.json()["field"] == "by"


def test_focus_export(api):
    first, last = (TODAY - timedelta(days=20)).date(), (TODAY - timedelta(days=1)).date()
    response = api["reader"].get(
        "/v1/analytics/export",
        params={"format": "focus", "agent": ["weekly-agent", "young-agent"], "from": first.isoformat(),
                "to": last.isoformat()},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {"BilledCost", "EffectiveCost", "ListCost", "BillingCurrency", "ChargePeriodStart", "ChargePeriodEnd",
            "BillingPeriodStart", "ChargeCategory", "ServiceName", "ServiceCategory", "ResourceId", "SubAccountId",
            "ProviderName", "ConsumedQuantity", "ConsumedUnit", "Tags"} <= set(rows[0])  # fmt: skip
    expected = [r for r in api["rows"] if r["tenant"] == TENANT and r["agent"] in ("weekly-agent", "young-agent")
                and TODAY - timedelta(days=20) <= r["timestamp"] < TODAY]  # fmt: skip
    assert sum(Decimal(r["BilledCost"]) for r in rows) == Decimal(sum(r["cost_nanos"] for r in expected)) / 10**9
    assert sum(int(r["x_Calls"]) for r in rows) == len(expected)
    assert {r["ResourceId"] for r in rows} == {"weekly-agent", "young-agent"}
    for r in rows:
        assert r["BilledCost"] == r["EffectiveCost"] and r["BillingCurrency"] == "USD"
        start, end = (datetime.fromisoformat(r[k]) for k in ("ChargePeriodStart", "ChargePeriodEnd"))
        assert end - start == timedelta(days=1) and start.hour == 0
        assert json.loads(r["Tags"])["spendstream/agent"] == r["ResourceId"]
        assert (r["ProviderName"], r["ServiceName"], r["ConsumedUnit"]) == ("openai", r["ServiceName"], "Tokens")


def test_forecast_days_and_month_are_the_time_zones(api):
    from zoneinfo import ZoneInfo

    zone = "Pacific/Kiritimati"  # UTC+14: its today is often not UTC's
    body = api["reader"].get("/v1/forecast", params={"agent": "weekly-agent", "horizon": 3, "tz": zone}).json()
    local_today = datetime.now(ZoneInfo(zone)).date()
    assert body["tz"] == zone and body["today"] == local_today.isoformat()
    assert body["series"][0]["date"] == local_today.isoformat()
    assert body["month_end"]["month"] == f"{local_today:%Y-%m}"
    # the local days hold the same events: the history's total is the agent's (its spend began 60 UTC days ago)
    assert body["history_days"] in (60, 61)
