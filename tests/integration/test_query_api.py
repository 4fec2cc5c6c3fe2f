"""Query API against the embedded ClickHouse: every figure equals an independent computation over
the raw rows inserted here (sums per bucket and per group, in time zones, across a month end)."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pyarrow.parquet as pq
import pytest
from query_api_stack import (  # pytest puts tests/integration on sys.path
    admin_and_reader,
    insert_events,
    make_events,
    migrate,
)

from query_api.logic import encode_cursor
from query_api.usage_sql import TOKEN_COLUMNS

pytestmark = pytest.mark.clickhouse

UTC = UTC
ADMIN_KEY = "ss_test_admin_" + "x" * 24
TENANT = "tenant_a"
OTHER = "tenant_b"
START = datetime(2024, 1, 29, tzinfo=UTC)
END = datetime(2024, 2, 3, tzinfo=UTC)
DST_START = datetime(2024, 3, 30, tzinfo=UTC)
DST_END = datetime(2024, 4, 1, 12, tzinfo=UTC)


@pytest.fixture(scope="module")
def stack(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    events = make_events(TENANT, 3000, START, END, seed=1) + make_events(TENANT, 400, DST_START, DST_END, seed=2)
    other = make_events(OTHER, 500, START, END, seed=3)
    insert_events(settings, events + other)
    with admin_and_reader(settings, ADMIN_KEY, TENANT) as (server, admin, reader):
        yield {"settings": settings, "events": events, "admin": admin, "reader": reader, "server": server}


def nanos(usd: str) -> int:
    return int(Decimal(usd) * 1_000_000_000)


def matches(e: dict, **filters) -> bool:
    for dim, values in filters.items():
        if dim == "tag":
            if not all(e["tags"].get(k) == v and k in e["tags"] for k, v in values):
                return False
        elif e[dim] not in values:
            return False
    return True


def expected(events: list[dict]) -> dict:
    calls = len(events)
    latencies = [e["latency_ms"] for e in events if e["latency_ms"] is not None]
    return {
        "calls": calls,
        "cost_nanos": sum(e["cost_nanos"] for e in events),
        "errors": sum(e["status"] == "error" for e in events),
        "unpriced_events": sum(e["pricing_status"] == "unknown_model" for e in events),
        "input": sum(e["input_tokens"] for e in events),
        "output": sum(e["output_tokens"] for e in events),
        "latency": sum(latencies) / len(latencies) if latencies else None,
    }


def observed(m: dict) -> dict:
    assert m["cost_nanos"] == nanos(m["cost_usd"])
    assert m["cost_usd_number"] == pytest.approx(float(Decimal(m["cost_usd"])))
    return {
        "calls": m["calls"],
        "cost_nanos": m["cost_nanos"],
        "errors": m["errors"],
        "unpriced_events": m["unpriced_events"],
        "input": m["tokens"]["input"],
        "output": m["tokens"]["output"],
        "latency": m["avg_latency_ms"],
    }


def in_range(events, start, end):
    return [e for e in events if start <= e["timestamp"] < end]


def assert_same(got: dict, want: dict) -> None:
    got_latency, want_latency = got.pop("latency"), want.pop("latency")
    assert (got_latency is None) == (want_latency is None)
    if want_latency is not None:
        assert got_latency == pytest.approx(want_latency)
    assert got == want


@pytest.mark.parametrize(
    "query, filters",
    [
        ({}, {}),
        ({"project": "tenant_a-proj-1"}, {"project": {"tenant_a-proj-1"}}),
        ({"agent": ["tenant_a-agent-0", "tenant_a-agent-3"]}, {"agent": {"tenant_a-agent-0", "tenant_a-agent-3"}}),
        ({"user": "tenant_a-user-2", "provider": "openai"}, {"user": {"tenant_a-user-2"}, "provider": {"openai"}}),
        ({"tag": "env:prod"}, {"tag": [("env", "prod")]}),
        (
            {"tag": ["env:prod", "team:ops"], "model": "m-large"},
            {"tag": [("env", "prod"), ("team", "ops")], "model": {"m-large"}},
        ),
    ],
)
def test_overview_equals_sums_over_raw_rows(stack, query, filters):
    frm, to = "2024-01-29T10:30:15.250Z", "2024-02-02T17:45:00Z"
    r = stack["reader"].get("/v1/analytics/overview", params={"from": frm, "to": to, **query})
    assert r.status_code == 200, r.text
    start, end = datetime.fromisoformat(frm), datetime.fromisoformat(to)
    rows = [e for e in in_range(stack["events"], start, end) if matches(e, **filters)]
    assert rows, "the case must select some events"
    want = expected(rows)
    body = r.json()
    assert_same(observed(body), want)
    assert body["error_rate"] == pytest.approx(want["errors"] / want["calls"])
    # the overview has every token class
    assert body["tokens"] == {c.removesuffix("_tokens"): sum(e[c] for e in rows) for c in TOKEN_COLUMNS}
    assert nanos(body["avg_cost_per_call_usd"]) == want["cost_nanos"] // want["calls"]


def test_aligned_ranges_are_answered_by_aggregates_only(stack):
    params = {"from": "2024-01-29", "to": "2024-02-02"}  # whole UTC days
    overview = stack["reader"].get("/v1/analytics/overview", params=params).json()
    assert overview["sources"] == ["usage_daily"]
    assert stack["reader"].get("/v1/analytics/timeseries", params=params | {"tz": "Europe/Berlin"}).json()[
        "sources"
    ] == ["usage_hourly"]
    assert stack["reader"].get("/v1/analytics/timeseries", params=params | {"tz": "Asia/Kolkata"}).json()[
        "sources"
    ] == ["usage_minute"]
    # users are not in the minute table, one tag is in the tag table: neither needs raw rows
    assert stack["reader"].get("/v1/analytics/overview", params=params | {"user": "x"}).json()["sources"] == [
        "usage_daily"
    ]
    assert stack["reader"].get("/v1/analytics/breakdown", params=params | {"by": "tag:env"}).json()["sources"] == [
        "usage_tags_daily"
    ]
    # a ragged edge below a minute is the only thing read raw
    ragged = (
        stack["reader"]
        .get("/v1/analytics/overview", params={"from": "2024-01-29T10:30:15Z", "to": "2024-02-02"})
        .json()
    )
    assert ragged["sources"] == ["usage_daily", "usage_events", "usage_hourly", "usage_minute"]


def bucket_of(t: datetime, granularity: str, tz: ZoneInfo):
    local = t.astimezone(tz)
    if granularity == "minute":
        return local.replace(second=0, microsecond=0)
    if granularity == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        return local.date()
    if granularity == "week":
        return local.date() - timedelta(days=local.weekday())
    return date(local.year, local.month, 1)


@pytest.mark.parametrize(
    "granularity, tz, frm, to",
    [
        ("day", "UTC", "2024-01-29T00:00:00Z", "2024-02-03T00:00:00Z"),
        ("day", "Europe/Berlin", "2024-01-29", "2024-02-02"),
        ("day", "Asia/Kolkata", "2024-01-29", "2024-02-02"),
        ("month", "America/New_York", "2024-01-29", "2024-02-02"),  # month end in New York
        ("week", "Australia/Sydney", "2024-01-29", "2024-02-02"),
        ("hour", "Asia/Kathmandu", "2024-01-31T20:00:00Z", "2024-02-01T08:00:00Z"),
        ("minute", "UTC", "2024-01-31T23:50:00Z", "2024-02-01T00:20:00Z"),
        ("day", "Europe/Berlin", "2024-03-30", "2024-04-01"),  # 23-hour day (DST starts)
        ("hour", "Europe/Berlin", "2024-03-30T22:00:00Z", "2024-03-31T04:00:00Z"),
    ],
)
def test_timeseries_is_zero_filled_and_equals_bucketed_sums(stack, granularity, tz, frm, to):
    zone = ZoneInfo(tz)
    r = stack["reader"].get(
        "/v1/analytics/timeseries", params={"granularity": granularity, "tz": tz, "from": frm, "to": to}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    start, end = datetime.fromisoformat(body["from"]), datetime.fromisoformat(body["to"])
    sums: dict = defaultdict(list)
    for e in in_range(stack["events"], start, end):
        sums[bucket_of(e["timestamp"], granularity, zone)].append(e)
    points = body["points"]
    keys = [bucket_of(datetime.fromisoformat(p["start"]), granularity, zone) for p in points]
    assert keys == sorted(set(keys)), "buckets are unique and ordered"
    assert set(sums) <= set(keys)
    assert (
        datetime.fromisoformat(points[0]["start"])
        <= start
        < datetime.fromisoformat(points[-1]["start"]) + timedelta(days=32)
    )
    assert all(datetime.fromisoformat(p["start"]) < end for p in points)
    for key, point in zip(keys, points):
        want = expected(sums.get(key, []))
        assert_same(observed(point), want)
    assert sum(p["calls"] for p in points) == len(in_range(stack["events"], start, end))
    # zero-filled: consecutive buckets, none skipped (minute/hour: fixed steps in UTC here)
    if granularity in ("minute", "hour"):
        step = timedelta(minutes=1 if granularity == "minute" else 60)
        instants = [datetime.fromisoformat(p["start"]) for p in points]
        assert all(b - a == step for a, b in zip(instants, instants[1:]))
    if granularity == "day":
        days = [k.toordinal() for k in keys]
        assert days == list(range(days[0], days[-1] + 1))


@pytest.mark.parametrize("by", ["project", "agent", "user", "provider", "model", "tag:env", "tag:team"])
def test_breakdown_equals_group_sums(stack, by):
    frm, to = "2024-01-29T06:00:00Z", "2024-02-02T18:30:00Z"
    r = stack["reader"].get("/v1/analytics/breakdown", params={"by": by, "from": frm, "to": to, "limit": 50})
    assert r.status_code == 200, r.text
    groups: dict = defaultdict(list)
    for e in in_range(stack["events"], datetime.fromisoformat(frm), datetime.fromisoformat(to)):
        if by.startswith("tag:"):
            if by[4:] in e["tags"]:
                groups[e["tags"][by[4:]]].append(e)
        else:
            groups[e[by]].append(e)
    got = r.json()["groups"]
    assert {g["key"] for g in got} == set(groups)
    for g in got:
        assert_same(observed(g), expected(groups[g["key"]]))
    costs = [g["cost_nanos"] for g in got]
    assert costs == sorted(costs, reverse=True)


def test_breakdown_order_and_limit(stack):
    r = stack["reader"].get(
        "/v1/analytics/breakdown", params={"by": "agent", "order": "name", "limit": 2, "from": "2024-01-29"}
    )
    assert [g["key"] for g in r.json()["groups"]] == ["tenant_a-agent-0", "tenant_a-agent-1"]
    bad = stack["reader"].get("/v1/analytics/breakdown", params={"order": "price"})
    assert bad.status_code == 422 and bad.json()["field"] == "order"


def test_events_pages_have_no_gaps_or_repeats(stack):
    frm, to = "2024-01-30T00:00:00Z", "2024-01-30T12:00:00Z"
    want = sorted(
        (
            e
            for e in in_range(stack["events"], datetime.fromisoformat(frm), datetime.fromisoformat(to))
            if e["project"] == "tenant_a-proj-0"
        ),
        key=lambda e: (e["timestamp"], e["event_id"]),
        reverse=True,
    )
    seen, cursor, pages = [], None, 0
    while True:
        params = {"from": frm, "to": to, "project": "tenant_a-proj-0", "limit": 17}
        if cursor:
            params["cursor"] = cursor
        body = stack["reader"].get("/v1/analytics/events", params=params).json()
        seen += body["events"]
        pages += 1
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert [e["event_id"] for e in seen] == [e["event_id"] for e in want]
    assert pages == -(-len(want) // 17)
    first = seen[0]
    source = next(e for e in want if e["event_id"] == first["event_id"])
    assert first["cost_nanos"] == source["cost_nanos"] and nanos(first["cost_usd"]) == source["cost_nanos"]
    assert first["tags"] == source["tags"] and first["latency_ms"] == source["latency_ms"]
    assert stack["reader"].get("/v1/analytics/events", params={"cursor": "garbage!"}).json()["field"] == "cursor"


def test_same_timestamp_events_page_by_event_id(stack):
    """A cursor inside a run of equal timestamps continues with the next event_id, not the next ms."""
    ts = datetime(2024, 1, 30, 6, 0, 0, 123000, tzinfo=UTC)
    twins = make_events(TENANT, 5, ts, ts + timedelta(milliseconds=1), seed=9, prefix="twin")
    insert_events(stack["settings"], twins)
    stack["events"].extend(twins)
    ids = sorted((e["event_id"] for e in twins), reverse=True)
    cursor = encode_cursor(int(ts.timestamp() * 1000), ids[1])
    body = (
        stack["reader"]
        .get(
            "/v1/analytics/events",
            params={"from": "2024-01-30T06:00:00Z", "to": "2024-01-30T06:00:01Z", "cursor": cursor, "limit": 10},
        )
        .json()
    )
    assert [e["event_id"] for e in body["events"]] == ids[2:]


def test_export_formats_equal_the_rows(stack):
    frm, to = "2024-01-31T00:00:00Z", "2024-01-31T06:00:00Z"
    want = sorted(
        in_range(stack["events"], datetime.fromisoformat(frm), datetime.fromisoformat(to)),
        key=lambda e: (e["timestamp"], e["event_id"]),
    )
    params = {"from": frm, "to": to}
    csv_r = stack["reader"].get("/v1/analytics/export", params=params | {"format": "csv"})
    assert csv_r.status_code == 200
    assert csv_r.headers["content-disposition"].startswith('attachment; filename="spendstream-events-20240131T000000Z')
    rows = list(csv.DictReader(io.StringIO(csv_r.text)))
    assert [r["event_id"] for r in rows] == [e["event_id"] for e in want]
    assert [Decimal(r["cost_usd"]) for r in rows] == [Decimal(e["cost_nanos"]).scaleb(-9) for e in want]
    as_json = stack["reader"].get("/v1/analytics/export", params=params | {"format": "json"}).json()
    assert [(r["event_id"], r["cost_nanos"], Decimal(r["cost_usd"])) for r in as_json] == [
        (e["event_id"], e["cost_nanos"], Decimal(e["cost_nanos"]).scaleb(-9)) for e in want
    ]
    ndjson = stack["reader"].get("/v1/analytics/export", params=params | {"format": "ndjson"}).text.splitlines()
    assert [json.loads(line)["event_id"] for line in ndjson] == [e["event_id"] for e in want]
    parquet = stack["reader"].get("/v1/analytics/export", params=params | {"format": "parquet"})
    table = pq.read_table(io.BytesIO(parquet.content))
    assert table.column("event_id").to_pylist() == [e["event_id"] for e in want]
    assert table.column("cost_usd").to_pylist() == [Decimal(e["cost_nanos"]).scaleb(-9) for e in want]


def test_breakdown_export_equals_breakdown(stack):
    params = {"from": "2024-01-29", "to": "2024-02-02", "by": "model"}
    api = stack["reader"].get("/v1/analytics/breakdown", params=params).json()["groups"]
    r = stack["reader"].get("/v1/analytics/export", params=params | {"format": "csv", "data": "breakdown"})
    assert 'filename="spendstream-breakdown-model-' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(r["key"], int(r["calls"]), int(r["cost_nanos"]), Decimal(r["cost_usd"])) for r in rows] == [
        (g["key"], g["calls"], g["cost_nanos"], Decimal(g["cost_usd"])) for g in api
    ]


def test_auth_scopes_and_field_errors(stack):
    with stack["server"].client(None) as anonymous:
        r = anonymous.get("/v1/analytics/overview")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert stack["server"].client("ss_0123456789abcdef_" + "y" * 30).get("/v1/analytics/overview").status_code == 401
    r = stack["reader"].post("/v1/projects", json={"id": "nope"})
    assert r.status_code == 403 and "admin" in r.json()["message"]
    r = stack["reader"].get("/v1/analytics/overview", params={"from": "yesterday"})
    assert r.status_code == 422 and r.json()["field"] == "from"
    r = stack["reader"].get("/v1/analytics/timeseries", params={"granularity": "fortnight"})
    assert r.status_code == 422 and r.json()["field"] == "granularity"
    r = stack["reader"].get("/v1/analytics/timeseries", params={"tz": "Mars/Olympus"})
    assert r.status_code == 422 and r.json()["field"] == "tz"
    r = stack["reader"].get("/v1/analytics/overview", params={"tag": "novalue"})
    assert r.status_code == 422 and r.json()["field"] == "tag"
    r = stack["reader"].get("/v1/analytics/overview", params={"from": "2024-02-02", "to": "2024-02-01"})
    assert r.status_code == 422 and r.json()["field"] == "from"


def test_projects(stack):
    admin = stack["admin"]
    r = admin.post("/v1/projects", json={"id": "checkout", "name": "Checkout", "description": "cart agents"})
    assert r.status_code == 201 and r.json()["name"] == "Checkout"
    assert admin.post("/v1/projects", json={"id": "checkout"}).status_code == 409
    bad = admin.post("/v1/projects", json={"id": "has space"})
    assert bad.status_code == 422 and bad.json()["field"] == "id"
    assert [p["id"] for p in stack["reader"].get("/v1/projects").json()["projects"]] == ["checkout"]
    assert stack["reader"].get("/v1/projects/checkout").json()["description"] == "cart agents"
    assert stack["reader"].get("/v1/projects/missing").status_code == 404


def test_keys_secret_once_and_revocation(stack):
    admin = stack["admin"]
    created = admin.post("/v1/keys", json={"scopes": ["read"], "name": "dashboard"})
    assert created.status_code == 201
    key = created.json()
    listed = {k["id"]: k for k in admin.get("/v1/keys").json()["keys"]}
    assert listed[key["id"]]["name"] == "dashboard" and "key" not in listed[key["id"]]
    assert all(key["key"] not in json.dumps(k) for k in listed.values())
    with stack["server"].client(key["key"]) as new:
        assert new.get("/v1/analytics/overview").status_code == 200
        assert admin.delete(f"/v1/keys/{key['id']}").status_code == 204
        assert new.get("/v1/analytics/overview").status_code == 401
    assert admin.delete(f"/v1/keys/{key['id']}").status_code == 404
    bad = admin.post("/v1/keys", json={"scopes": ["root"]})
    assert bad.status_code == 422 and bad.json()["field"] == "scopes"
    assert stack["reader"].get("/v1/keys").status_code == 403


def test_pricing_catalog_overrides_and_unpriced(stack):
    reader, admin = stack["reader"], stack["admin"]
    catalog = reader.get("/v1/pricing", params={"provider": "openai"}).json()
    assert any(m["model_id"] == "gpt-4o" for m in catalog["models"])
    price = reader.get("/v1/pricing/openai/gpt-4o", params={"at": "2025-01-01"}).json()
    assert price["price_source"] == "catalog" and price["per_mtok"]["input"] == "2.5"
    unknown = reader.get("/v1/pricing/google/mystery-model").json()
    assert unknown["price_source"] == "none"
    body = {
        "provider": "google",
        "model": "mystery-model",
        "effective_from": "2024-01-01T00:00:00Z",
        "per_mtok": {"input": "0.25", "output": "1.125"},
    }
    assert reader.put("/v1/pricing/overrides", json=body).status_code == 403
    put = admin.put("/v1/pricing/overrides", json=body)
    assert put.status_code == 200, put.text
    now = reader.get("/v1/pricing/google/mystery-model").json()
    assert now["price_source"] == "override" and now["per_mtok"]["output"] == "1.125"
    before = reader.get("/v1/pricing/google/mystery-model", params={"at": "2023-06-01"}).json()
    assert before["price_source"] == "none"
    bad = admin.put("/v1/pricing/overrides", json=body | {"per_mtok": {"input": "-1"}})
    assert bad.status_code == 422 and bad.json()["field"] == "input_mtok"
    bad = admin.put("/v1/pricing/overrides", json=body | {"effective_to": "2023-01-01T00:00:00Z"})
    assert bad.status_code == 422 and bad.json()["field"] == "effective_to"
    unpriced = {(m["provider"], m["model"]): m for m in reader.get("/v1/pricing/unpriced").json()["models"]}
    counts: dict = defaultdict(int)
    for e in stack["events"]:
        if e["pricing_status"] == "unknown_model":
            counts[(e["provider"], e["model"])] += 1
    assert {k: v["events"] for k, v in unpriced.items()} == dict(counts)
    assert unpriced[("google", "mystery-model")]["priced_now"] is True
    assert unpriced[("openai", "mystery-model")]["priced_now"] is False
    override_id = put.json()["id"]
    assert admin.delete(f"/v1/pricing/overrides/{override_id}").status_code == 204
    assert reader.get("/v1/pricing/google/mystery-model").json()["price_source"] == "none"


def test_health_metrics_and_openapi(stack):
    server = stack["server"]
    with server.client(None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["clickhouse"] is True
        stack["reader"].get("/v1/analytics/overview")
        metrics = c.get("/metrics").text
        assert 'spendstream_query_api_requests_total{method="GET",route="/v1/analytics/overview"' in metrics
        paths = c.get("/openapi.json").json()["paths"]
        for path in (
            "/v1/analytics/overview",
            "/v1/analytics/timeseries",
            "/v1/analytics/breakdown",
            "/v1/analytics/events",
            "/v1/analytics/export",
            "/v1/sql",
            "/v1/pricing/unpriced",
            "/v1/keys",
        ):
            assert path in paths
        docs = c.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text and "https://" not in docs.text
        assert c.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
