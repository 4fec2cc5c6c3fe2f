"""OpenAI's organization usage and costs (admin key as ``Authorization: Bearer``), per
WIRE-CONTRACTS.md section 3 (openai-python ``types/admin/organization/usage_*``):

- ``GET /organization/usage/completions`` (base URL includes ``/v1``): hourly buckets grouped by
  model, project_id and api_key_id; ``input_tokens`` already includes cached and cache-write
  tokens, as the event contract's ``input_tokens`` does.
- ``GET /organization/costs``: daily buckets by line_item and project_id; ``amount.value`` is a
  float of USD (read via its shortest repr, rounded to the nano-USD).
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
    count,
    dollars_nanos,
    from_unix,
    model_name,
    name,
    obj,
    parse_page,
)

PROVIDER = "openai"
USAGE_PATH = "/organization/usage/completions"
COSTS_PATH = "/organization/costs"
USAGE_LIMIT = 168  # 1h buckets: at most 168 a page
COSTS_LIMIT = 180  # 1d buckets: at most 180 a page


def headers(admin_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_key}"}


def usage_params(start: datetime, end: datetime) -> list[tuple[str, str]]:
    return [
        ("start_time", str(int(start.timestamp()))),
        ("end_time", str(int(end.timestamp()))),
        ("bucket_width", "1h"),
        ("limit", str(USAGE_LIMIT)),
        ("group_by[]", "model"),
        ("group_by[]", "project_id"),
        ("group_by[]", "api_key_id"),
    ]


def costs_params(start: datetime, end: datetime) -> list[tuple[str, str]]:
    return [
        ("start_time", str(int(start.timestamp()))),
        ("end_time", str(int(end.timestamp()))),
        ("bucket_width", "1d"),
        ("limit", str(COSTS_LIMIT)),
        ("group_by[]", "line_item"),
        ("group_by[]", "project_id"),
    ]


def _usage_row(r: dict[str, Any], start: datetime, end: datetime, at: str) -> UsageRow:
    return UsageRow(
        provider=PROVIDER,
        bucket_start=start,
        bucket_end=end,
        model=model_name(r, "model", at),
        project_id=name(r, "project_id", at),
        api_key_id=name(r, "api_key_id", at),
        service_tier=name(r, "service_tier", at),
        input_tokens=count(r, "input_tokens", at),
        output_tokens=count(r, "output_tokens", at),
        cache_read_tokens=count(r, "input_cached_tokens", at),
        cache_write_tokens=count(r, "input_cache_write_tokens", at),
        input_audio_tokens=count(r, "input_audio_tokens", at),
        output_audio_tokens=count(r, "output_audio_tokens", at),
        requests=count(r, "num_model_requests", at),
    )


def parse_usage_page(answer: Any) -> Page:
    return parse_page(answer, "start_time", "end_time", from_unix, _usage_row)


def model_of_line_item(line_item: str) -> str:
    """``"gpt-4o-2024-08-06, input"`` -> ``"gpt-4o-2024-08-06"``: OpenAI names the model first."""
    return line_item.split(",", 1)[0].strip().lower()


def _cost_row(r: dict[str, Any], start: datetime, end: datetime, at: str) -> CostRow:
    amount = obj(r.get("amount"), f"{at}.amount")
    currency = name(amount, "currency", f"{at}.amount").lower() or "usd"
    if currency != "usd":
        raise PageError(f"{at}.amount.currency", f"only usd is supported, got {currency!r}")
    line_item = name(r, "line_item", at)
    return CostRow(
        provider=PROVIDER,
        bucket_start=start,
        bucket_end=end,
        amount_nanos=dollars_nanos(amount.get("value"), f"{at}.amount.value"),
        currency=currency,
        model=model_of_line_item(line_item),
        project_id=name(r, "project_id", at),
        line_item=line_item,
    )


def parse_costs_page(answer: Any) -> Page:
    return parse_page(answer, "start_time", "end_time", from_unix, _cost_row)
