"""Dates and times outside what ClickHouse's DateTime64(3) columns hold (1900-01-01 to 2299-12-31)
are a 422 naming the parameter on every route that takes one, never a 5xx; the range's own ends
are answered. Real query API (uvicorn) on the embedded ClickHouse, with a few events in range."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from query_api_stack import QueryApiServer, insert_events, make_events, migrate

pytestmark = pytest.mark.clickhouse

ADMIN = "ss_test_admin_" + "h" * 24
TENANT = "dates"
START, END = datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 3, tzinfo=UTC)
ROUTES = [
    "/v1/analytics/overview", "/v1/analytics/timeseries", "/v1/analytics/breakdown", "/v1/analytics/events",
    "/v1/analytics/export", "/v1/alerts",
]  # fmt: skip


@pytest.fixture(scope="module")
def api(make_settings) -> Iterator[httpx.Client]:
    settings = make_settings(bootstrap_admin_key=ADMIN, bootstrap_tenant=TENANT)
    migrate(settings)
    insert_events(settings, make_events(TENANT, 50, START, END, seed=11))
    with QueryApiServer(settings) as server, server.client(ADMIN) as client:
        yield client


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"to": "9999-12-31"}, "to"),
        ({"from": "1000-01-01"}, "from"),
        ({"from": "1899-12-31T23:59:59.999Z", "to": "1900-01-02"}, "from"),
        ({"to": "2300-01-01T00:00:00.001Z"}, "to"),
        ({"from": "0001-01-01T00:00:00+01:00"}, "from"),
    ],
)
def test_out_of_range_dates_are_422_naming_the_parameter(api, path, params, field):
    answer = api.get(path, params=params)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and "1900-01-01" in answer.json()["message"]


def test_out_of_range_pricing_instant_names_at(api):
    answer = api.get("/v1/pricing/openai/gpt-4o", params={"at": "9999-12-31"})
    assert answer.status_code == 422 and answer.json()["field"] == "at"


@pytest.mark.parametrize("path", ROUTES)
def test_the_ends_of_the_range_are_answered(api, path):
    whole = api.get(path, params={"from": "1900-01-01", "to": "2299-12-31", "granularity": "month"})
    assert whole.status_code == 200, whole.text
    early = api.get(path, params={"to": "1900-01-10"})  # the default 30 days would start before 1900
    assert early.status_code == 200, early.text


def test_figures_over_the_whole_range_count_every_event(api):
    overview = api.get("/v1/analytics/overview", params={"from": "1900-01-01", "to": "2299-12-31"}).json()
    assert overview["calls"] == 50
    assert (overview["from"], overview["to"]) == ("1900-01-01T00:00:00+00:00", "2300-01-01T00:00:00+00:00")
    early = api.get("/v1/analytics/overview", params={"to": "1900-01-10"}).json()
    assert early["from"] == "1900-01-01T00:00:00+00:00" and early["calls"] == 0
