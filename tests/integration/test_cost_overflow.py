"""Cost sums past Int64 stay exact: in every aggregate (through its view, its merge, its projection
and the tenant views) and through the query API, which returns them as exact decimal strings.

10,000 events at the per-event cap (10^15 nano-USD each, every class at the cap) land in one
minute of one key, in ONE insert: 10^19 nano-USD per class, past Int64's 9.22 * 10^18, so a
view summing Int64 would wrap inside the insert block already (clickhouse/schema/0009_*.sql).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from query_api_stack import COST_PARTS, QueryApiServer, insert_events, migrate

from spendstream.aggregates import AGGREGATES as REGISTRY
from spendstream.clickhouse import get_client
from spendstream.money import INT64_MAX, MAX_EVENT_COST_NANOS

pytestmark = pytest.mark.clickhouse

UTC = UTC
ADMIN_KEY = "ss_test_admin_" + "c" * 24
TENANT = "capped"
EVENTS = 10_000
MINUTE = datetime(2025, 3, 4, 10, 7, tzinfo=UTC)
#: per class; cost_nanos, the total of eight classes, is 8 times that
CLASS_SUM = EVENTS * MAX_EVENT_COST_NANOS
TOTAL_SUM = len(COST_PARTS) * CLASS_SUM
COST_COLUMNS = ["cost_nanos"] + [f"cost_{p}_nanos" for p in COST_PARTS]
#: every aggregate with cost sums (the capped events carry a tag, so the tagged one has them too)
AGGREGATES = tuple(a for a in REGISTRY if set(COST_COLUMNS) <= a.measure_names)


def capped_event(i: int) -> dict:
    return {
        "tenant": TENANT, "project": "p", "agent": "a", "user": "u", "session_id": "s", "operation": "",
        "tags": {"team": "t"}, "provider": "openai", "model": "m",
        **dict.fromkeys(("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                         "cache_write_1h_tokens", "reasoning_tokens", "input_audio_tokens", "output_audio_tokens"), 1),
        "cost_nanos": len(COST_PARTS) * MAX_EVENT_COST_NANOS,
        **{f"cost_{p}_nanos": MAX_EVENT_COST_NANOS for p in COST_PARTS},
        "price_id": "client", "pricing_status": "client", "price_source": "client", "status": "ok",
        "latency_ms": 10, "event_id": f"cap-{i:05d}", "timestamp": MINUTE + timedelta(milliseconds=3 * i),
        "received_at": MINUTE, "partition": 0, "offset": i, "src_partition": 0, "src_offset": i,
    }  # fmt: skip


@pytest.fixture(scope="module")
def stack(make_settings):
    assert CLASS_SUM > INT64_MAX
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    insert_events(settings, [capped_event(i) for i in range(EVENTS)])
    client = get_client(settings)
    try:
        yield settings, client
    finally:
        client.close()


def test_every_aggregate_sums_past_int64_exactly(stack) -> None:
    settings, client = stack
    assert AGGREGATES
    sums = ", ".join(f"sum({c})" for c in COST_COLUMNS)
    expected = (TOTAL_SUM, *[CLASS_SUM] * len(COST_PARTS))

    def read(table: str, **kw) -> tuple:
        return tuple(client.query(f"SELECT {sums} FROM {table} WHERE tenant = {{t:String}}",
                                  parameters={"t": TENANT}, **kw).result_rows[0])  # fmt: skip

    for aggregate in AGGREGATES:
        table = aggregate.table
        assert read(table) == expected, table
        if aggregate.tenant_view:
            # an analyst's view: it was created again over the new column types, no cast back to Int64
            scoped = {"log_comment": TENANT, "readonly": 1}
            assert read(f"{settings.clickhouse.database}_tenant.{table}", settings=scoped) == expected, table
    for table in (a.table for a in AGGREGATES):
        client.command(f"OPTIMIZE TABLE {table} FINAL")  # SummingMergeTree adds the rows up in Int128
        rows = client.query(f"SELECT count(), {sums} FROM {table} WHERE tenant = {{t:String}}",
                            parameters={"t": TENANT}).result_rows  # fmt: skip
        assert rows == [(1, *expected)], table
    # the raw rows need a widening sum, as the query API writes it
    raw = client.query("SELECT sum(toInt128(cost_nanos)), sum(cost_nanos) FROM usage_events").result_rows[0]
    assert raw[0] == TOTAL_SUM and raw[1] != TOTAL_SUM  # Int64's sum wraps: why nothing reads it so


def test_the_projection_without_user_sums_in_int128(stack) -> None:
    _, client = stack
    sql = "SELECT project, sum(cost_nanos) FROM usage_daily WHERE tenant = {t:String} GROUP BY project"
    plan = "\n".join(r[0] for r in client.query(f"EXPLAIN {sql}", parameters={"t": TENANT}).result_rows)
    assert "without_user" in plan  # ClickHouse answers from the projection re-added by 0009
    assert client.query(sql, parameters={"t": TENANT}).result_rows == [("p", TOTAL_SUM)]


def test_the_query_api_returns_sums_past_int64_as_exact_strings(stack) -> None:
    settings, _ = stack
    start, end = MINUTE.replace(minute=0), MINUTE.replace(minute=0) + timedelta(hours=1)
    exact_usd = f"{Decimal(TOTAL_SUM).scaleb(-9):f}"
    with QueryApiServer(settings) as server, server.client(ADMIN_KEY) as api:
        overview = api.get("/v1/analytics/overview", params={"from": start.isoformat(), "to": end.isoformat()})
        # a range whose start is not a whole minute: the capped events are summed from usage_events
        just_after = (MINUTE + timedelta(milliseconds=1)).isoformat()
        raw = api.get("/v1/analytics/overview", params={"from": just_after, "to": end.isoformat()})
        breakdown = api.get("/v1/analytics/breakdown", params={"from": start.isoformat(), "to": end.isoformat(),
                                                               "by": "model"})  # fmt: skip
        series = api.get("/v1/analytics/timeseries", params={"from": start.isoformat(), "to": end.isoformat(),
                                                             "granularity": "minute"})  # fmt: skip
    for response in (overview, raw, breakdown, series):
        assert response.status_code == 200, response.text
    body = overview.json()
    assert "usage_events" not in body["sources"]
    assert (body["cost_nanos"], body["cost_usd"], body["calls"]) == (str(TOTAL_SUM), exact_usd, EVENTS)
    assert body["avg_cost_per_call_nanos"] == TOTAL_SUM // EVENTS  # back within Int64: a number again
    raw_body = raw.json()
    assert "usage_events" in raw_body["sources"]
    # the first event (at the minute's start) is outside this range
    first = len(COST_PARTS) * MAX_EVENT_COST_NANOS
    assert (raw_body["cost_nanos"], raw_body["calls"]) == (str(TOTAL_SUM - first), EVENTS - 1)
    (group,) = breakdown.json()["groups"]
    assert (group["key"], group["cost_nanos"], group["cost_usd"]) == ("m", str(TOTAL_SUM), exact_usd)
    points = [p for p in series.json()["points"] if p["calls"]]
    assert [(p["cost_nanos"], p["calls"]) for p in points] == [(str(TOTAL_SUM), EVENTS)]
