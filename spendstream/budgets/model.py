"""A budget's configuration and the validation of what the API accepts for one. Pure: no IO.

A budget limits the spend of a scope (any of project, agent, user, provider, model and one tag
``key=value``; none = the whole tenant) per window (see :mod:`spendstream.budgets.windows`) and
alerts at thresholds, percents of its limit. Names, limits, scopes, thresholds and time zones
are checked here, for the query API's budget routes; a ``ValueError`` says what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import available_timezones

from spendstream.contracts import BUDGET_SCOPE_FIELDS
from spendstream.money import BUDGET_LIMIT

DEFAULT_THRESHOLDS = (Decimal(50), Decimal(80), Decimal(100))
MAX_NAME = 256
MAX_THRESHOLDS = 20
MAX_SCOPE_VALUE = 256


@dataclass(frozen=True, slots=True)
class Budget:
    tenant: str
    id: str
    name: str
    #: set scope fields only (BUDGET_SCOPE_FIELDS); "tag" is "key=value"
    scope: Mapping[str, str]
    window: str
    timezone: str
    limit_nanos: int
    thresholds: tuple[Decimal, ...] = DEFAULT_THRESHOLDS
    forecast: bool = True
    channels: tuple[str, ...] = ()
    enforce: bool = False

    @property
    def config_kind(self) -> str:
        """Windows of another kind or zone are different windows: state of the old kind is dropped."""
        return f"{self.window}|{self.timezone}"


def check_timezone(name: str) -> str:
    """The IANA zone name, or ValueError. Only real zone names: no abbreviations, no files."""
    if not isinstance(name, str) or name not in _zone_names():
        raise ValueError(f"not an IANA time zone name: {name!r}")
    return name


_ZONES: frozenset[str] | None = None


def _zone_names() -> frozenset[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = frozenset(available_timezones()) | {"UTC"}
    return _ZONES


def parse_limit_nanos(value: str | int | float) -> int:
    """A USD amount (decimal string or JSON number) -> nano-USD, within ``BUDGET_LIMIT``'s range
    (see spendstream/money.py); ``MoneyError`` (a ValueError naming ``limit_usd``) otherwise."""
    return BUDGET_LIMIT.nanos(value)


#: C0/C1 controls (CR and LF above all), Unicode line/paragraph separators and lone surrogates: a
#: name is copied into e-mail subjects and headers, chat messages and logs, where these split lines
_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def check_budget_name(name: str) -> str:
    """The name trimmed, or ValueError: blank, longer than ``MAX_NAME``, or with control characters."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("must be a non-blank string")
    if len(name) > MAX_NAME:
        raise ValueError(f"at most {MAX_NAME} characters")
    bad = _UNSAFE_NAME_CHARS.search(name)
    if bad:
        raise ValueError(f"must not contain control characters such as CR or LF (found U+{ord(bad[0]):04X})")
    return name.strip()


def parse_thresholds(values: Iterable[Any]) -> tuple[Decimal, ...]:
    """Percents in 1..1000 with at most 3 decimals, sorted, without duplicates."""
    out: set[Decimal] = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"not a number: {value!r}")
        try:
            d = Decimal(value.strip() if isinstance(value, str) else repr(value))
        except InvalidOperation:
            raise ValueError(f"not a number: {value!r}") from None
        if not d.is_finite() or not 1 <= d <= 1000:
            raise ValueError(f"each threshold must be between 1 and 1000 (percent), got {value!r}")
        if d != d.quantize(Decimal("0.001")):
            raise ValueError(f"at most 3 decimal places, got {value!r}")
        out.add(d.normalize())
    if not out:
        raise ValueError("give at least one threshold")
    if len(out) > MAX_THRESHOLDS:
        raise ValueError(f"at most {MAX_THRESHOLDS} thresholds")
    return tuple(sorted(out))


def parse_scope(scope: Mapping[str, Any]) -> dict[str, str]:
    """Validate a scope object; raises ``ScopeError(field, message)``. Names are normalised as the
    gateway normalises events (provider/model lower-case), so a budget matches what is stored."""
    out: dict[str, str] = {}
    for key, value in scope.items():
        if key not in BUDGET_SCOPE_FIELDS:
            raise ScopeError(key, f"unknown scope field; use {', '.join(BUDGET_SCOPE_FIELDS)}")
        if value is None or value == "":
            continue
        if not isinstance(value, str) or len(value) > MAX_SCOPE_VALUE or not value.strip():
            raise ScopeError(key, f"must be a non-blank string of at most {MAX_SCOPE_VALUE} characters")
        value = value.strip()
        if key in ("provider", "model"):
            value = value.lower()
        if key == "tag":
            tag_key, sep, tag_value = value.partition("=")
            if not sep or not tag_key.strip():
                raise ScopeError(key, "must be 'key=value'")
            value = f"{tag_key.strip()}={tag_value.strip()}"
        out[key] = value
    return out


class ScopeError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def canonical_threshold(t: Decimal) -> str:
    return format(t.normalize(), "f")
