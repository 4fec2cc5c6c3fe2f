"""Anthropic's Admin API usage and cost reports (``x-api-key: <admin key>``,
``anthropic-version``), per WIRE-CONTRACTS.md section 3:

- ``GET /v1/organizations/usage_report/messages``: hourly buckets grouped by model, api_key_id and
  workspace_id. Anthropic reports input EXCLUDING cache: the event contract's ``input_tokens`` is
  ``uncached_input_tokens + cache_read_input_tokens + cache_creation.*`` (both TTLs);
  ``cache_write_1h_tokens`` is the 1-hour part.
- ``GET /v1/organizations/cost_report``: daily buckets by workspace_id and description; ``amount``
  is a decimal STRING in cents (``"123.45"`` = $1.2345), converted exactly.
Pagination: ``page=<next_page>`` while ``has_more``. Pure: requests are described, not sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from spendstream.collectors.model import (
    CostRow,
    Page,
    PageError,
    UsageRow,
    cents_nanos,
    count,
    from_rfc3339,
    model_name,
    name,
    obj,
    parse_page,
)

PROVIDER = "anthropic"
USAGE_PATH = "/v1/organizations/usage_report/messages"
COSTS_PATH = "/v1/organizations/cost_report"
USAGE_LIMIT = 168  # 1h buckets
COSTS_LIMIT = 31  # 1d buckets
API_VERSION = "2023-06-01"


def headers(admin_key: str) -> dict[str, str]:
    return {"x-api-key": admin_key, "anthropic-version": API_VERSION}


def _rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def usage_params(start: datetime, end: datetime) -> list[tuple[str, str]]:
    return [
        ("starting_at", _rfc3339(start)),
        ("ending_at", _rfc3339(end)),
        ("bucket_width", "1h"),
        ("limit", str(USAGE_LIMIT)),
        ("group_by[]", "model"),
        ("group_by[]", "api_key_id"),
        ("group_by[]", "workspace_id"),
    ]


def costs_params(start: datetime, end: datetime) -> list[tuple[str, str]]:
    return [
        ("starting_at", _rfc3339(start)),
        ("ending_at", _rfc3339(end)),
        ("bucket_width", "1d"),
        ("limit", str(COSTS_LIMIT)),
        ("group_by[]", "workspace_id"),
        ("group_by[]", "description"),
    ]


def _usage_row(r: dict[str, Any], start: datetime, end: datetime, at: str) -> UsageRow:
    creation = r.get("cache_creation")
    if creation is not None:
        creation = obj(creation, f"{at}.cache_creation")
    write_1h = count(creation, "ephemeral_1h_input_tokens", f"{at}.cache_creation")
    write_5m = count(creation, "ephemeral_5m_input_tokens", f"{at}.cache_creation")
    read = count(r, "cache_read_input_tokens", at)
    tools = r.get("server_tool_use")
    if tools is not None:
        tools = obj(tools, f"{at}.server_tool_use")
    return UsageRow(
        provider=PROVIDER,
        bucket_start=start,
        bucket_end=end,
        model=model_name(r, "model", at),
        project_id=name(r, "workspace_id", at),
        api_key_id=name(r, "api_key_id", at),
        service_tier=name(r, "service_tier", at),
        input_tokens=count(r, "uncached_input_tokens", at) + read + write_5m + write_1h,
        output_tokens=count(r, "output_tokens", at),
        cache_read_tokens=read,
        cache_write_tokens=write_5m + write_1h,
        cache_write_1h_tokens=write_1h,
        web_search_requests=count(tools, "web_search_requests", f"{at}.server_tool_use"),
    )


def parse_usage_page(answer: Any) -> Page:
    return parse_page(answer, "starting_at", "ending_at", from_rfc3339, _usage_row)


def _cost_row(r: dict[str, Any], start: datetime, end: datetime, at: str) -> CostRow:
    currency = name(r, "currency", at).lower() or "usd"
    if currency != "usd":
        raise PageError(f"{at}.currency", f"only USD is supported, got {currency!r}")
    return CostRow(
        provider=PROVIDER,
        bucket_start=start,
        bucket_end=end,
        amount_nanos=cents_nanos(r.get("amount"), f"{at}.amount"),
        currency=currency,
        model=model_name(r, "model", at),
        project_id=name(r, "workspace_id", at),
        line_item=name(r, "description", at),
        cost_type=name(r, "cost_type", at),
        token_type=name(r, "token_type", at),
        service_tier=name(r, "service_tier", at),
    )


def parse_costs_page(answer: Any) -> Page:
    return parse_page(answer, "starting_at", "ending_at", from_rfc3339, _cost_row)
