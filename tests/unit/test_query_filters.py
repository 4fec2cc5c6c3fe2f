"""Filters: parsing query parameters, and the SQL fragments with bound parameters they become."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from query_api.errors import InvalidField
from query_api.filters import Params, attribute_conditions, parse_filters, parse_instant
from query_api.logic import DAY, HOUR, MINUTE
from query_api.usage_sql import GroupBy, UsageQuery, build_usage_query, eligible_sources

NOW = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)


def filters(**kw):
    base = {"start": None, "end": None, "tz": None, "dims": {}, "tags": None, "now": NOW}
    return parse_filters(**(base | kw))


def test_dates_are_days_in_the_zone_and_to_includes_its_day():
    f = filters(start="2024-03-01", end="2024-03-02", tz="Europe/Berlin")
    assert f.start == datetime(2024, 2, 29, 23, tzinfo=UTC)
    assert f.end == datetime(2024, 3, 2, 23, tzinfo=UTC)


def test_timestamps_keep_their_offset_and_naive_ones_use_the_zone():
    assert parse_instant("from", "2024-03-01T10:00:00+02:00", ZoneInfo("UTC"), end_of_day=False) == datetime(
        2024, 3, 1, 8, tzinfo=UTC
    )
    assert parse_instant("from", "2024-03-01T10:00:00Z", ZoneInfo("Asia/Tokyo"), end_of_day=False).hour == 10
    assert parse_instant("from", "2024-03-01T10:00:00", ZoneInfo("Asia/Tokyo"), end_of_day=False).hour == 1


def test_defaults_are_the_last_30_days():
    f = filters()
    assert f.end == NOW and (f.end - f.start).days == 30


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"start": "last week"}, "from"),
        ({"end": "2024-13-01"}, "to"),
        ({"start": "2024-03-02", "end": "2024-03-01"}, "from"),
        ({"tz": "Nowhere/Land"}, "tz"),
        ({"tags": ["no-colon"]}, "tag"),
        ({"tags": [":v"]}, "tag"),
        ({"dims": {"region": ["eu"]}}, "region"),
    ],
)
def test_bad_parameters_name_their_field(kw, field):
    with pytest.raises(InvalidField) as err:
        filters(**kw)
    assert err.value.field == field


def test_conditions_bind_every_value():
    f = filters(dims={"project": ["a'b"], "agent": ["x", "y"], "user": None}, tags=["env:prod"])
    params = Params()
    conds = attribute_conditions(f, params)
    sql = " AND ".join(conds)
    assert "a'b" not in sql and "prod" not in sql
    assert sorted(params.values.values(), key=str) == sorted(["a'b", ["x", "y"], "env", "prod"], key=str)
    assert "`agent` IN {agent_" in sql and "mapContains(tags, {tag_key_" in sql


def test_source_choice_follows_filters_and_grouping():
    base = filters(start="2024-03-01", end="2024-03-05")
    assert set(eligible_sources(UsageQuery(base))) == {DAY, HOUR, MINUTE}
    with_user = filters(start="2024-03-01", end="2024-03-05", dims={"user": ["u"]})
    assert set(eligible_sources(UsageQuery(with_user))) == {DAY, HOUR}
    one_tag = filters(start="2024-03-01", end="2024-03-05", tags=["env:prod"])
    assert {s.table for s in eligible_sources(UsageQuery(one_tag)).values()} == {"usage_tags_daily"}
    two_tags = filters(start="2024-03-01", end="2024-03-05", tags=["env:prod", "team:a"])
    assert eligible_sources(UsageQuery(two_tags)) == {}
    tag_and_user = filters(start="2024-03-01", end="2024-03-05", tags=["env:prod"], dims={"user": ["u"]})
    assert eligible_sources(UsageQuery(tag_and_user)) == {}
    assert eligible_sources(UsageQuery(base, use_aggregates=False)) == {}
    by_tag = UsageQuery(base, group=GroupBy.parse("tag:env"))
    assert {s.table for s in eligible_sources(by_tag).values()} == {"usage_tags_daily"}


def test_built_sql_is_tenant_scoped_and_parameterised():
    f = filters(start="2024-03-01T10:30:00Z", end="2024-03-05", dims={"project": ["p1"]})
    built = build_usage_query(UsageQuery(f, granularity="day"), "tenant'x", order_by="cost_nanos DESC", limit=5)
    assert "tenant'x" not in built.sql and "p1" not in built.sql
    assert built.sql.count("tenant = {tenant_") == len(built.tables) == 3
    assert built.tables == ["usage_minute", "usage_hourly", "usage_daily"]
    assert built.sql.endswith(f"LIMIT {{limit_{len(built.params) - 1}:UInt32}}")
