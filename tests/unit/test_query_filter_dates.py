"""Analytics and alert filters refuse instants ClickHouse cannot hold (DateTime64(3): 1900-01-01 to
2299-12-31), naming the parameter, instead of failing later (Python overflow or ClickHouse)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from query_api.errors import InvalidField
from query_api.filters import EARLIEST, LATEST, parse_filters, parse_instant

NOW = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
UTC = ZoneInfo("UTC")


def filters(**kw):
    return parse_filters(**({"start": None, "end": None, "tz": None, "dims": {}, "tags": None, "now": NOW} | kw))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"end": "9999-12-31"}, "to"),  # its end of day is past year 9999
        ({"start": "1000-01-01"}, "from"),
        ({"start": "1000-01-01", "end": "1000-02-01"}, "to"),
        ({"start": "0001-01-01T00:00:00+01:00"}, "from"),  # before year 1 in UTC
        ({"start": "9999-12-31T23:00:00-02:00"}, "from"),  # after year 9999 in UTC
        ({"start": "1899-12-31T23:59:59.999Z"}, "from"),
        ({"end": "2300-01-01T00:00:00.001Z"}, "to"),
        ({"end": "2299-12-31", "tz": "America/New_York"}, "to"),  # that day ends at 05:00 UTC in 2300
        ({"start": "1900-01-01", "tz": "Europe/Berlin"}, "from"),  # local midnight is 1899 in UTC
    ],
)
def test_instants_outside_clickhouse_range_name_their_parameter(kw, field):
    with pytest.raises(InvalidField) as err:
        filters(**kw)
    assert err.value.field == field and "1900-01-01" in err.value.message


def test_the_range_itself_is_accepted():
    f = filters(start="1900-01-01", end="2299-12-31")
    assert (f.start, f.end) == (EARLIEST, LATEST)


def test_the_default_from_stops_at_the_earliest_instant():
    f = filters(end="1900-01-10")
    assert f.start == EARLIEST and f.end == datetime(1900, 1, 11, tzinfo=UTC)


def test_other_parameters_are_named_too():
    with pytest.raises(InvalidField) as err:
        parse_instant("at", "9999-12-31T23:59:59Z", UTC, end_of_day=False)
    assert err.value.field == "at"
