"""The one registry of collectors (house style 9): a provider's datasets, how to ask for a page of
each and how to read it. The connections API's accepted ``provider`` values, the scheduler's jobs
and the CLI derive from :data:`PROVIDERS`. Adding a provider: a pure module like ``openai.py``,
its entry here, and its fixtures and test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from spendstream.collectors import anthropic, openai
from spendstream.collectors.model import Page


@dataclass(frozen=True)
class Dataset:
    """One report of a provider: ``usage`` (hourly tokens) or ``costs`` (daily money)."""

    kind: str  # "usage" | "costs"
    path: str
    bucket_seconds: int
    params: Callable[[datetime, datetime], list[tuple[str, str]]]
    parse: Callable[[Any], Page]


@dataclass(frozen=True)
class Provider:
    name: str
    headers: Callable[[str], dict[str, str]]
    datasets: tuple[Dataset, ...]
    #: the scheduler's default crontab (the issue: OpenAI every 6 h at :10, Anthropic hourly at :05)
    default_schedule: str


HOUR = 3600
DAY = 86400

PROVIDERS: dict[str, Provider] = {
    "openai": Provider(
        "openai",
        openai.headers,
        (
            Dataset("usage", openai.USAGE_PATH, HOUR, openai.usage_params, openai.parse_usage_page),
            Dataset("costs", openai.COSTS_PATH, DAY, openai.costs_params, openai.parse_costs_page),
        ),
        "10 */6 * * *",
    ),
    "anthropic": Provider(
        "anthropic",
        anthropic.headers,
        (
            Dataset("usage", anthropic.USAGE_PATH, HOUR, anthropic.usage_params, anthropic.parse_usage_page),
            Dataset("costs", anthropic.COSTS_PATH, DAY, anthropic.costs_params, anthropic.parse_costs_page),
        ),
        "5 * * * *",
    ),
}
