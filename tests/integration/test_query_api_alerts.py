"""GET /v1/alerts keyset pagination: pages walked with next_cursor give every alert of the tenant
exactly once, newest first, also when several alerts share a millisecond and under a filter."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from query_api_stack import QueryApiServer, migrate

from spendstream.clickhouse import get_client

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "p" * 24
TENANT, OTHER = "alerts_tenant", "alerts_other"
T0 = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
ALERT_COLUMNS = ["tenant", "alert_id", "kind", "budget_id", "budget_name", "scope", "window_start", "window_end",
                 "threshold", "spent_nanos", "limit_nanos", "percent_used", "projected_nanos", "projected_at",
                 "event_id", "top", "fired_at"]  # fmt: skip


def alert_row(tenant: str, alert_id: str, budget_id: str, fired_at: datetime) -> list:
    return [tenant, alert_id, "threshold", budget_id, budget_id, {}, T0, None, Decimal(80), 8_000_000_000,
            10_000_000_000, Decimal(80), None, None, f"ev_{alert_id}", "[]", fired_at]  # fmt: skip


@pytest.fixture(scope="module")
def alerts(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    rng = random.Random(7)
    # 9 distinct instants, several alerts on each: a cursor must break ties by alert_id
    mine = [alert_row(TENANT, f"al_{i:02d}", f"bud_{i % 3}", T0 + timedelta(milliseconds=rng.randrange(9) * 1500))
            for i in range(31)]  # fmt: skip
    theirs = [alert_row(OTHER, f"al_{i:02d}", "bud_0", T0 + timedelta(milliseconds=i)) for i in range(10)]
    client = get_client(settings)
    try:
        client.insert("budget_alerts", mine + theirs, column_names=ALERT_COLUMNS)
    finally:
        client.close()
    with QueryApiServer(settings) as server, server.client(ADMIN_KEY) as admin:
        yield admin, mine


def walk(api, params: dict) -> tuple[list[str], int]:
    """Alert ids of every page in order, and the number of pages."""
    ids, pages, cursor = [], 0, None
    while True:
        response = api.get("/v1/alerts", params=params | ({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text
        body = response.json()
        ids += [a["alert_id"] for a in body["alerts"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages
        assert pages < 100, "pagination does not end"


def newest_first(rows: list[list]) -> list[str]:
    return [r[1] for r in sorted(rows, key=lambda r: (r[-1], r[1]), reverse=True)]


def test_pages_have_no_gaps_or_repeats(alerts):
    api, mine = alerts
    for limit in (1, 4, 31, 1000):
        ids, pages = walk(api, {"limit": limit})
        assert ids == newest_first(mine), f"limit {limit}"
        assert pages == max(1, -(-len(mine) // limit)), f"limit {limit}: an exact last page needs no empty page"


def test_pages_under_a_filter(alerts):
    api, mine = alerts
    ids, _ = walk(api, {"limit": 3, "budget_id": "bud_1"})
    assert ids == newest_first([r for r in mine if r[3] == "bud_1"])
    first_of_window = (T0 + timedelta(milliseconds=3000)).isoformat()
    ids, _ = walk(api, {"limit": 5, "from": first_of_window})
    assert ids == newest_first([r for r in mine if r[-1] >= T0 + timedelta(milliseconds=3000)])


def test_a_foreign_cursor_is_refused(alerts):
    api, _ = alerts
    response = api.get("/v1/alerts", params={"cursor": "not-a-cursor"})
    assert response.status_code == 422 and response.json()["field"] == "cursor"
