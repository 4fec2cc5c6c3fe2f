"""Analytics filters: parsing query parameters into a typed ``Filters``, and ``Filters`` into a WHERE
fragment with bound parameters. Pure: no HTTP or ClickHouse imports.

Every fragment is tenant-scoped by construction (``tenant = {tenant:String}`` is always the first
condition) and user input only ever reaches ClickHouse as a bound ``{name:Type}`` parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from query_api.errors import InvalidField
from spendstream.timeutil import epoch_ms

#: attribution dimensions that can be filtered and grouped by (column names of usage_events; the
#: session fields are only there, so a query using one reads usage_events, not an aggregate)
DIMENSIONS: tuple[str, ...] = ("project", "agent", "user", "provider", "model", "session_label", "session_type")
DEFAULT_RANGE = timedelta(days=30)
MAX_TAG_FILTERS = 8
#: what every time column (DateTime64(3, 'UTC'), clickhouse/schema/) can hold: an instant outside
#: this is refused rather than compared against values ClickHouse wraps or clamps. LATEST is the
#: exclusive end of the range, so it is accepted as a ``to``.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2300, 1, 1, tzinfo=UTC)
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class Filters:
    """A half-open time range [start, end) in UTC plus attribution filters.

    ``dims`` maps a dimension to the values it may take (repeated query parameters are ORed);
    ``tags`` are (key, value) pairs that must all match.
    """

    start: datetime
    end: datetime
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    dims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    def dimension_names(self) -> frozenset[str]:
        return frozenset(d for d, _ in self.dims)


def parse_tz(value: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(value or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidField("tz", f"unknown IANA time zone {value!r}") from None


def parse_instant(name: str, value: str, tz: ZoneInfo, *, end_of_day: bool) -> datetime:
    """RFC 3339 timestamp, or a date meaning that day in ``tz`` (its end when ``end_of_day``).

    A timestamp without an offset is read in ``tz``, like a date. The instant must lie within
    [EARLIEST, LATEST], what ClickHouse stores.
    """
    text = value.strip()
    try:
        if _DATE_ONLY.match(text):
            day = date.fromisoformat(text) + timedelta(days=1 if end_of_day else 0)
            local = datetime(day.year, day.month, day.day, tzinfo=tz)
        else:
            local = datetime.fromisoformat(text.replace("z", "Z"))
            if local.tzinfo is None:
                local = local.replace(tzinfo=tz)
        instant = local.astimezone(UTC)
    except OverflowError:  # the day after 9999-12-31, or an offset across year 1 or 9999
        instant = None
    except ValueError:
        raise InvalidField(name, f"expected an RFC 3339 timestamp or YYYY-MM-DD, got {value!r}") from None
    if instant is None or not EARLIEST <= instant <= LATEST:
        last_day = LATEST - timedelta(days=1)
        raise InvalidField(
            name, f"{value!r} is outside the supported range, {EARLIEST:%Y-%m-%d} to {last_day:%Y-%m-%d} (UTC)"
        )
    return instant


def parse_filters(
    *,
    start: str | None,
    end: str | None,
    tz: str | None,
    dims: dict[str, list[str] | None],
    tags: list[str] | None,
    now: datetime,
) -> Filters:
    """Validate raw query parameters. ``start``/``end`` are the ``from``/``to`` parameters."""
    zone = parse_tz(tz)
    end_at = parse_instant("to", end, zone, end_of_day=True) if end else now.astimezone(UTC)
    # the default range stops at the earliest instant ClickHouse stores
    start_at = parse_instant("from", start, zone, end_of_day=False) if start else max(end_at - DEFAULT_RANGE, EARLIEST)
    if start_at >= end_at:
        raise InvalidField("from", "'from' must be before 'to'")
    dim_items = []
    for name, values in dims.items():
        if name not in DIMENSIONS:
            raise InvalidField(name, f"unknown dimension; expected one of {', '.join(DIMENSIONS)}")
        cleaned = tuple(dict.fromkeys(v for v in (values or []) if v != ""))
        if cleaned:
            dim_items.append((name, cleaned))
    return Filters(start=start_at, end=end_at, tz=zone, dims=tuple(sorted(dim_items)), tags=parse_tags(tags or []))


def parse_tags(values: list[str]) -> tuple[tuple[str, str], ...]:
    if len(values) > MAX_TAG_FILTERS:
        raise InvalidField("tag", f"at most {MAX_TAG_FILTERS} tag filters")
    pairs = []
    for raw in values:
        key, sep, value = raw.partition(":")
        if not sep or not key:
            raise InvalidField("tag", f"expected key:value, got {raw!r}")
        pairs.append((key, value))
    return tuple(pairs)


@dataclass
class Params:
    """Collects bound parameters; ``add`` returns the ``{name:Type}`` placeholder to put in SQL."""

    values: dict[str, object] = field(default_factory=dict)

    def add(self, value: object, ch_type: str, hint: str = "p") -> str:
        name = f"{hint}_{len(self.values)}"
        self.values[name] = value
        return f"{{{name}:{ch_type}}}"


def tenant_condition(tenant: str, params: Params) -> str:
    return f"tenant = {params.add(tenant, 'String', 'tenant')}"


def attribute_conditions(filters: Filters, params: Params, *, tag_columns: bool = False) -> list[str]:
    """Dimension and tag conditions (never the time range: each source has its own time column).

    Tags are read from the ``tags`` map, or with ``tag_columns`` from the ``tag_key``/``tag_value``
    columns of the tag aggregate. Either way a tag filter matches events that carry the key.
    """
    conds = []
    for dim, values in filters.dims:
        if len(values) == 1:
            conds.append(f"`{dim}` = {params.add(values[0], 'String', dim)}")
        else:
            conds.append(f"`{dim}` IN {params.add(list(values), 'Array(String)', dim)}")
    for key, value in filters.tags:
        k, v = params.add(key, "String", "tag_key"), params.add(value, "String", "tag_value")
        conds.append(
            f"tag_key = {k} AND tag_value = {v}" if tag_columns else f"mapContains(tags, {k}) AND tags[{k}] = {v}"
        )
    return conds


def instant_param(t: datetime, params: Params, hint: str) -> str:
    """A DateTime64(3, 'UTC') value bound as epoch milliseconds (exact, whatever the server zone)."""
    return f"fromUnixTimestamp64Milli({params.add(epoch_ms(t), 'Int64', hint)}, 'UTC')"
