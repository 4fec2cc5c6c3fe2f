"""The rows collectors produce, the money and name rules they share, and the error a page that
breaks the documented shape raises. Pure: no HTTP, no ClickHouse."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from spendstream.money import NANOS_PER_USD, MoneyError, MoneyRule

#: one reported amount (a day's line item): generous, the range only keeps Int64 sums safe
MAX_REPORTED_NANOS = 10**9 * NANOS_PER_USD
#: amounts computed here (cents -> USD, float dollars) are rounded to the nano-USD, half to even
REPORTED_AMOUNT = MoneyRule("amount", -MAX_REPORTED_NANOS, MAX_REPORTED_NANOS, round_sub_nano=True)
MAX_TOKENS = 10**15  # per bucket and group; far beyond any organisation's hour
MAX_NAME = 512
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class PageError(ValueError):
    """A provider's answer does not have the documented shape; ``where`` says which part."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One hourly usage bucket of one group (model, project/workspace, API key), tokens in the event
    contract's meaning: ``input_tokens`` INCLUDES cache reads and writes and audio input."""

    provider: str
    bucket_start: datetime
    bucket_end: datetime
    model: str = ""
    project_id: str = ""  # OpenAI project_id, Anthropic workspace_id
    api_key_id: str = ""
    service_tier: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    requests: int = 0
    web_search_requests: int = 0


@dataclass(frozen=True, slots=True)
class CostRow:
    """One daily cost line: exact nano-USD."""

    provider: str
    bucket_start: datetime
    bucket_end: datetime
    amount_nanos: int
    currency: str = "usd"
    model: str = ""
    project_id: str = ""
    line_item: str = ""  # OpenAI line_item, Anthropic description
    cost_type: str = ""
    token_type: str = ""
    service_tier: str = ""


@dataclass(slots=True)
class Bucket:
    """One bucket of a page: its span and its rows (empty when the provider had nothing)."""

    start: datetime
    end: datetime
    rows: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class Page:
    buckets: list[Bucket]
    has_more: bool
    next_page: str | None


# ---------------------------------------------------------------- field readers


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PageError(where, "must be an object")
    return value


def items(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PageError(where, "must be a list")
    return value


def count(container: dict[str, Any] | None, key: str, where: str) -> int:
    """A token/request count; absent or null is 0."""
    value = None if container is None else container.get(key)
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_TOKENS:
        raise PageError(f"{where}.{key}", f"must be an integer in 0..{MAX_TOKENS}")
    return value


def name(container: dict[str, Any], key: str, where: str) -> str:
    """A group key or label; null when not grouped -> ''."""
    value = container.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_NAME or _UNSAFE.search(value):
        raise PageError(f"{where}.{key}", f"must be a string of at most {MAX_NAME} characters")
    return value.strip()


def model_name(container: dict[str, Any], key: str, where: str) -> str:
    """A model as the gateway stores event models: trimmed, lower case."""
    return name(container, key, where).lower()


def page_cursor(answer: dict[str, Any]) -> tuple[bool, str | None]:
    has_more = answer.get("has_more", False)
    if not isinstance(has_more, bool):
        raise PageError("has_more", "must be a boolean")
    next_page = answer.get("next_page")
    if next_page is not None and (not isinstance(next_page, str) or len(next_page) > 4096):
        raise PageError("next_page", "must be a string of at most 4096 characters or null")
    if has_more and not next_page:
        raise PageError("next_page", "missing although has_more is true")
    return has_more, next_page if has_more else None


RowOf = Callable[[dict[str, Any], datetime, datetime, str], Any]


def parse_page(
    answer: Any, start_key: str, end_key: str, parse_time: Callable[[Any, str], datetime], row_of: RowOf
) -> Page:
    """A provider's page of time buckets, each result made a row by ``row_of(result, bucket_start,
    bucket_end, where)``. Both providers page the same way and differ only in the bounds' names,
    their time format and the rows' fields."""
    answer = obj(answer, "page")
    buckets = []
    for i, raw in enumerate(items(answer.get("data"), "data")):
        where = f"data[{i}]"
        bucket = obj(raw, where)
        start = parse_time(bucket.get(start_key), f"{where}.{start_key}")
        end = parse_time(bucket.get(end_key), f"{where}.{end_key}")
        if end <= start:
            raise PageError(f"{where}.{end_key}", f"must be after {start_key}")
        results = items(bucket.get("results"), f"{where}.results")
        rows = []
        for j, result in enumerate(results):
            at = f"{where}.results[{j}]"
            rows.append(row_of(obj(result, at), start, end, at))
        buckets.append(Bucket(start, end, rows))
    has_more, next_page = page_cursor(answer)
    return Page(buckets, has_more, next_page)


def from_unix(value: Any, where: str) -> datetime:
    if type(value) is not int or not 0 <= value < 2**33:
        raise PageError(where, "must be a unix time in seconds")
    return datetime.fromtimestamp(value, UTC)


def from_rfc3339(value: Any, where: str) -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise PageError(where, "must be an RFC 3339 date-time")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PageError(where, "must be an RFC 3339 date-time") from None
    if parsed.tzinfo is None:
        raise PageError(where, "must carry a UTC offset")
    return parsed.astimezone(UTC)


def dollars_nanos(value: Any, where: str) -> int:
    """OpenAI's ``amount.value``: a JSON number of USD (a float), read via its shortest repr."""
    if type(value) not in (int, float, str):
        raise PageError(where, "must be a number of USD")
    try:
        return REPORTED_AMOUNT.nanos(value)
    except MoneyError as exc:
        raise PageError(where, exc.message) from None


def cents_nanos(value: Any, where: str) -> int:
    """Anthropic's ``amount``: a decimal STRING of cents ("123.45" = $1.2345), exact."""
    if not isinstance(value, str) or len(value) > 64:
        raise PageError(where, "must be a decimal string of cents")
    try:
        cents = Decimal(value.strip())
    except InvalidOperation:
        raise PageError(where, "must be a decimal string of cents") from None
    if not cents.is_finite():
        raise PageError(where, "must be a finite decimal string of cents")
    try:
        return REPORTED_AMOUNT.nanos(cents.scaleb(-2))
    except MoneyError as exc:
        raise PageError(where, exc.message) from None
