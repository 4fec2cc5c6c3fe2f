"""Budgets API against the embedded ClickHouse: CRUD and durability, field-naming validation
errors, scopes, and status figures equal to sums over the raw rows of the current window."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from query_api_stack import (  # tests/integration on sys.path
    admin_and_reader,
    insert_events,
    make_events,
    migrate,
)

from spendstream.budgets import Attribution, current_window, parse_limit_nanos, scope_matches
from spendstream.budgets.store import budget_from_row, insert_alerts, scope_columns
from spendstream.clickhouse import get_client
from spendstream.contracts import nanos_to_usd_str
from spendstream.keys import create_key

pytestmark = pytest.mark.clickhouse

UTC = UTC
ADMIN_KEY = "ss_test_admin_" + "b" * 24
TENANT = "tenant_budgets"
BODY = {
    "name": "search agents", "scope": {"project": "p", "agent": "a"}, "window": "daily", "timezone": "Europe/Berlin",
    "limit_usd": "10.00", "thresholds": [50, 80, 100], "forecast": True, "channels": ["oncall@example.com"],
    "enforce": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def api(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    with admin_and_reader(settings, ADMIN_KEY, TENANT) as (_, admin, reader):
        yield {"settings": settings, "admin": admin, "reader": reader}


def test_crud_round_trip_and_durability(api):
    admin, reader = api["admin"], api["reader"]
    created = admin.post("/v1/budgets", json=BODY)
    assert created.status_code == 201, created.text
    b = created.json()
    assert b["id"].startswith("bud_")
    assert {k: b[k] for k in BODY} == {**BODY, "limit_usd": "10.000000000"}
    assert reader.get(f"/v1/budgets/{b['id']}").json() == b
    assert b["id"] in [x["id"] for x in reader.get("/v1/budgets").json()["budgets"]]

    changed = admin.put(f"/v1/budgets/{b['id']}", json={**BODY, "limit_usd": 25, "thresholds": [90, "12.5"]})
    assert changed.status_code == 200, changed.text
    c = changed.json()
    assert c["limit_usd"] == "25.000000000" and c["thresholds"] == [12.5, 90]
    assert c["created_at"] == b["created_at"] and c["updated_at"] >= b["updated_at"]

    # what the stage reads is the latest version
    client = get_client(api["settings"])
    try:
        rows = list(client.query("SELECT * FROM budgets FINAL WHERE deleted = 0 AND id = {id:String}",
                                 parameters={"id": b["id"]}).named_results())  # fmt: skip
    finally:
        client.close()
    assert budget_from_row(rows[0]).limit_nanos == 25_000_000_000

    assert admin.delete(f"/v1/budgets/{b['id']}").status_code == 204
    assert reader.get(f"/v1/budgets/{b['id']}").status_code == 404
    assert admin.delete(f"/v1/budgets/{b['id']}").status_code == 404
    assert b["id"] not in [x["id"] for x in reader.get("/v1/budgets").json()["budgets"]]
    assert admin.put("/v1/budgets/bud_missing", json=BODY).status_code == 404


def test_scopes_and_validation_errors_name_the_field(api):
    admin, reader = api["admin"], api["reader"]
    assert reader.post("/v1/budgets", json=BODY).status_code == 403
    cases = [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": "CEST"}, "timezone"),
        ({"window": "fortnightly"}, "window"),
        ({"limit_usd": "0"}, "limit_usd"),
        ({"limit_usd": "-5"}, "limit_usd"),
        ({"limit_usd": "ten"}, "limit_usd"),
        ({"thresholds": [0]}, "thresholds"),
        ({"thresholds": [50, 1001]}, "thresholds"),
        ({"thresholds": []}, "thresholds"),
        ({"scope": {"team": "x"}}, "scope.team"),
        ({"scope": {"tag": "novalue"}}, "scope.tag"),
        ({"channels": ["wh_does_not_exist"]}, "channels"),
        ({"name": ""}, "name"),
        ({"surprise": 1}, "surprise"),
    ]
    for change, field in cases:
        r = admin.post("/v1/budgets", json={**BODY, **change})
        assert r.status_code == 422, (change, r.text)
        assert r.json()["field"] == field, (change, r.json())
    missing = admin.post("/v1/budgets", json={k: v for k, v in BODY.items() if k != "limit_usd"})
    assert missing.status_code == 422 and missing.json()["field"] == "limit_usd"


@pytest.fixture(scope="module")
def window_rows(api):
    """Events of today in New York and of the 6 hours before it (yesterday there: never counted)."""
    now = datetime.now(UTC)
    probe = budget_from_row({"tenant": TENANT, **_row_of({**BODY, "id": "probe", "timezone": "America/New_York"})})
    start = datetime.fromtimestamp(current_window(probe, int(now.timestamp() * 1000))[0] / 1000, UTC)
    events = make_events(TENANT, 300, start, now - timedelta(seconds=1), seed=5, prefix="p1")
    events += make_events(TENANT, 100, start - timedelta(hours=6), start, seed=6, prefix="p1")
    insert_events(api["settings"], events)
    return events


@pytest.mark.parametrize("scope", [{"project": "p1-proj-1"}, {"agent": "p1-agent-2", "provider": "openai"},
                                   {"tag": "team=search"}, {"user": "p1-user-1"}, {}])  # fmt: skip
def test_status_equals_the_raw_rows_of_the_current_window(api, window_rows, scope):
    body = {**BODY, "scope": scope, "timezone": "America/New_York", "channels": []}
    b = api["admin"].post("/v1/budgets", json=body).json()
    budget = budget_from_row({"tenant": TENANT, **_row_of(b)})
    status = api["reader"].get(f"/v1/budgets/{b['id']}/status").json()
    start_ms, end_ms = current_window(budget, int(time.time() * 1000))
    want = sum(
        e["cost_nanos"] for e in window_rows
        if start_ms <= int(e["timestamp"].timestamp() * 1000) < end_ms
        and scope_matches(budget.scope, Attribution.of_event(e))
    )  # fmt: skip
    assert want > 0
    assert status["spent_usd"] == nanos_to_usd_str(want)
    assert status["window_start"] == datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert status["limit_usd"] == "10.000000000" and status["source"] == "clickhouse"
    assert status["budget"]["id"] == b["id"]


def test_status_lists_the_alerts_of_the_window(api):
    b = api["admin"].post("/v1/budgets", json={**BODY, "window": "total", "channels": []}).json()
    alert = {
        "tenant": TENANT, "alert_id": "al_test_1", "kind": "threshold", "budget_id": b["id"], "budget_name": b["name"],
        "scope": b["scope"], "window_start": "1970-01-01T00:00:00.000Z", "window_end": None, "threshold": "50",
        "spent_nanos": 5_000_000_000, "limit_nanos": 10_000_000_000, "percent_used": "50.00", "projected_nanos": None,
        "projected_at": None, "event_id": "e1", "top": [], "created_at": "2024-01-01T00:00:00.000Z",
    }  # fmt: skip
    client = get_client(api["settings"])
    try:
        insert_alerts(client, [alert, alert])  # a re-sent alert is one row
    finally:
        client.close()
    status = api["reader"].get(f"/v1/budgets/{b['id']}/status").json()
    assert [(a["alert_id"], a["threshold"], a["spent_usd"]) for a in status["alerts"]] == [
        ("al_test_1", 50, "5.000000000")
    ]
    assert status["window_start"] is None and status["window_end"] is None


def _row_of(view: dict) -> dict:
    """A budgets table row from an API view (or request body)."""
    return {
        "id": view["id"], "name": view["name"], **scope_columns(view["scope"]), "window": view["window"],
        "timezone": view["timezone"], "limit_nanos": parse_limit_nanos(view["limit_usd"]),
        "thresholds": view["thresholds"], "forecast": view["forecast"], "channels": view["channels"],
        "enforce": view["enforce"],
    }  # fmt: skip


def test_listing_is_per_tenant(api):
    settings = api["settings"]
    client = get_client(settings)
    try:
        _, other_admin = create_key(client, "someone_else", ["admin", "read"], "other")
    finally:
        client.close()
    with httpx.Client(base_url=f"http://127.0.0.1:{settings.query_api.port}",
                      headers={"Authorization": f"Bearer {other_admin}"}) as other:  # fmt: skip
        mine = other.post("/v1/budgets", json={**BODY, "channels": []}).json()
        ids = [b["id"] for b in other.get("/v1/budgets").json()["budgets"]]
        assert ids == [mine["id"]]
    assert mine["id"] not in [b["id"] for b in api["reader"].get("/v1/budgets").json()["budgets"]]
    assert api["reader"].get(f"/v1/budgets/{mine['id']}").status_code == 404
