"""The SQL pricer of recommendations and cost comparison (``query_api.insights_sql.price_sql``)
prices events exactly as the pricing stage's ``price()`` does, for every model of the catalog:
date-bound price changes, time-of-day windows, input-size tiers, cache, reasoning and audio
tokens, per-request prices and half-even rounding."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from query_api_stack import insert_events, migrate  # tests/integration is on sys.path
from test_insights_api import event

from query_api.filters import Params, parse_filters
from query_api.insights_sql import price_sql, repriced_sql
from spendstream.clickhouse import get_client
from spendstream.pricing import default_catalog, price

pytestmark = pytest.mark.clickhouse

TENANT = "tenant_insights"  # the tenant event() writes
SHAPES = [
    dict(input_tokens=1_234, output_tokens=567),
    dict(input_tokens=250_001, output_tokens=3_001, cache_read_tokens=200_000, cache_write_tokens=10_000,
         cache_write_1h_tokens=4_000),
    dict(input_tokens=130_000, output_tokens=40_000, reasoning_tokens=30_000),
    dict(input_tokens=7_777, output_tokens=999, input_audio_tokens=1_111, output_audio_tokens=333),
    dict(input_tokens=1, output_tokens=1),
]  # fmt: skip
TIMES = [datetime(2024, 3, 1, 10, 0, tzinfo=UTC), datetime(2025, 6, 15, 17, 45, tzinfo=UTC),
         datetime(2026, 11, 20, 2, 30, tzinfo=UTC)]  # fmt: skip
BATCH = 80


@pytest.fixture(scope="module")
def priced_events(make_settings):
    settings = make_settings(bootstrap_tenant=TENANT)
    migrate(settings)
    rows = []
    for ts in TIMES:
        for shape in SHAPES:
            rows.append(event(len(rows), ts, agent="pricer", model="gpt-4o", **shape))
    insert_events(settings, rows)
    return settings, rows


def test_sql_prices_equal_price_for_every_catalog_model(priced_events):
    settings, rows = priced_events
    catalog = default_catalog()
    models = [m for m in catalog.models() if catalog.resolve(m.provider_id, m.model_id).model is m]
    filters = parse_filters(start="2020-01-01", end="2030-01-01", tz=None, dims={}, tags=None, now=datetime.now(UTC))
    client = get_client(settings)
    mismatches = []
    try:
        for start in range(0, len(models), BATCH):
            batch = models[start : start + BATCH]
            params = Params()
            sql = repriced_sql(
                filters, TENANT, params, [], {f"m{i}": price_sql(m.schedule) for i, m in enumerate(batch)}
            )
            got = client.query(sql, parameters=params.values).first_item
            for i, m in enumerate(batch):
                expected = 0
                for r in rows:
                    usage = {k: r[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                                               "cache_write_1h_tokens", "reasoning_tokens", "input_audio_tokens",
                                               "output_audio_tokens")}  # fmt: skip
                    line = price({"provider": m.provider_id, "model": m.model_id,
                                  "timestamp": r["timestamp"].strftime("%Y-%m-%dT%H:%M:%S.000Z"), **usage}, catalog)  # fmt: skip
                    expected += line.cost_nanos
                if int(got[f"m{i}"]) != expected:
                    mismatches.append((m.provider_id, m.model_id, int(got[f"m{i}"]), expected))
    finally:
        client.close()
    assert len(models) > 500
    assert mismatches == []
