"""Savings recommendations from usage telemetry and the price catalog. Pure: usage summaries in,
recommendations out.

Every figure covers the last :data:`WINDOW_DAYS` days of one (agent, project, provider, model):
"monthly" savings are what those days would have cost less, in nano-USD. The query API computes
the exact re-pricings per event in ClickHouse (``query_api/insights_sql.py``: each event priced
on the other model, or one tier lower, rounded half to even as the pricing stage rounds) and
hands them in with the usage summary.

Kinds
-----
- ``model_downgrade``: the agent's successful calls re-priced on the cheaper model of
  :data:`~spendstream.insights.catalog_info.SUBSTITUTIONS`, only where the mean output is below
  :data:`DOWNGRADE_MAX_MEAN_OUTPUT_TOKENS` tokens, no reasoning tokens were used, and the p99
  input fits the alternative's context window (a model whose window genai-prices does not state
  is not proposed).
- ``prompt_caching``: at least :data:`CACHING_MIN_CALLS` successful calls on
  :data:`CACHING_MIN_ACTIVE_DAYS` days, mean input of :data:`CACHING_MIN_MEAN_INPUT_TOKENS`
  tokens or more, and at most :data:`CACHING_MAX_READ_SHARE` of input read from cache. Estimate
  (stated in the evidence): :data:`CACHEABLE_SHARE` of the uncached input is a reusable prefix,
  written once per :data:`CACHE_READS_PER_WRITE` reads, at the model's cache read and write
  prices; only for models whose cache read price is below their input price.
- ``batch_api``: at least :data:`BATCH_MIN_CALLS` successful calls that are either tagged
  ``batch`` = ``ok``/``true``/``yes`` (half of them or more) or bursty (the busiest
  :data:`BURST_TOP_HOURS_SHARE` of active hours carry :data:`BURST_MIN_CALL_SHARE` of the calls),
  priced at the provider's batch discount (:data:`~spendstream.insights.catalog_info.BATCH_DISCOUNTS`).
- ``long_context_tier``: successful calls whose input is above a tier threshold of the model's
  price by at most :data:`TIER_MARGIN` (all their tokens pay the higher tier), re-priced one tier
  lower (as if the input were trimmed under the threshold).
- ``error_waste``: the spend on calls with ``status = error``.

The same dollars are never counted twice for one agent: error waste covers only the error calls,
and of the four kinds that re-price the successful calls of one (agent, project, provider, model)
only the one saving most is recommended.

Priority: savings times ease (:data:`EASE`, 0..1): ``high`` from :data:`HIGH_SCORE_USD` a month,
``medium`` from :data:`MEDIUM_SCORE_USD`, else ``low``. ``confidence`` (0..1) says how much the
figure is a re-pricing of what happened (high) rather than an estimate under assumptions (low).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import Any

from spendstream.insights import usd
from spendstream.insights.catalog_info import BATCH_DISCOUNTS, catalog_model, context_window, substitute
from spendstream.insights.repricing import atoms
from spendstream.money import NANOS_PER_USD
from spendstream.pricing.catalog import Catalog
from spendstream.pricing.logic import round_half_even

WINDOW_DAYS = 30
DOWNGRADE_MAX_MEAN_OUTPUT_TOKENS = 500
CACHING_MIN_CALLS = 100
CACHING_MIN_ACTIVE_DAYS = 7
CACHING_MIN_MEAN_INPUT_TOKENS = 1024
CACHING_MAX_READ_SHARE = 0.10
CACHEABLE_SHARE = Fraction(1, 2)
CACHE_READS_PER_WRITE = 9
BATCH_MIN_CALLS = 100
BATCH_TAG_VALUES = ("ok", "true", "yes")
BURST_TOP_HOURS_SHARE = 0.10
BURST_MIN_CALL_SHARE = 0.5
TIER_MARGIN = Fraction(1, 10)
EASE = {"prompt_caching": 0.9, "long_context_tier": 0.7, "model_downgrade": 0.6, "batch_api": 0.5, "error_waste": 0.5}
CONFIDENCE = {"error_waste": 0.9, "model_downgrade": 0.7, "long_context_tier": 0.6, "batch_api": 0.5,
              "prompt_caching": 0.4}  # fmt: skip
HIGH_SCORE_USD = 50
MEDIUM_SCORE_USD = 5
TYPES = ("model_downgrade", "prompt_caching", "batch_api", "long_context_tier", "error_waste")


@dataclass(frozen=True)
class Usage:
    """One (agent, project, provider, model) over the window, as the query API summarised it."""

    agent: str
    project: str
    provider: str
    model: str
    calls: int
    error_calls: int
    cost_nanos: int
    error_cost_nanos: int
    #: token sums of the successful calls (contract v1 names)
    ok_tokens: dict[str, int] = field(default_factory=dict)
    mean_output_tokens: float = 0.0
    p99_input_tokens: int = 0
    active_days: int = 0
    batch_tagged_calls: int = 0
    #: calls per active hour (any order), for burstiness
    hourly_calls: tuple[int, ...] = ()
    #: the successful calls re-priced on the substitute (None: not computed)
    downgrade_cost_nanos: int | None = None
    #: successful calls just over a tier threshold: (calls, cost as charged, cost one tier lower)
    near_tier: tuple[int, int, int] | None = None

    @property
    def ok_calls(self) -> int:
        return self.calls - self.error_calls

    @property
    def ok_cost_nanos(self) -> int:
        return self.cost_nanos - self.error_cost_nanos


def peak_share(hourly_calls: Sequence[int]) -> float:
    """Share of the calls in the busiest BURST_TOP_HOURS_SHARE of the active hours."""
    active = sorted((c for c in hourly_calls if c > 0), reverse=True)
    if not active:
        return 0.0
    top = max(1, math.ceil(len(active) * BURST_TOP_HOURS_SHARE))
    return sum(active[:top]) / sum(active)


def _rates(catalog: Catalog, u: Usage, today: date):
    model = catalog_model(catalog, u.provider, u.model)
    if model is None:
        return None, None
    schedule = model.schedule
    row = schedule.fixed or schedule.defaults[min(len(schedule.defaults) - 1, _interval(schedule, today))]
    return model, row


def _interval(schedule, today: date) -> int:
    from bisect import bisect_right

    return bisect_right(schedule.date_bounds, today.isoformat())


def _item(kind: str, u: Usage, savings: int, title: str, description: str, actions: list[str],
          evidence: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    return {
        "type": kind,
        "title": title,
        "description": description,
        "agent": u.agent,
        "project": u.project,
        "provider": u.provider,
        "model": u.model,
        "estimated_savings_monthly": usd(savings),
        "estimated_savings_monthly_nanos": savings,
        "action_items": actions,
        "evidence": {"window_days": WINDOW_DAYS, "calls": u.calls, "cost_usd": usd(u.cost_nanos), **evidence},
        "confidence": CONFIDENCE[kind],
    }


def downgrade(catalog: Catalog, u: Usage) -> dict[str, Any] | None:
    model = catalog_model(catalog, u.provider, u.model)
    alt = substitute(catalog, model) if model else None
    if alt is None or u.downgrade_cost_nanos is None or u.ok_calls == 0:
        return None
    window = context_window(alt)
    reasoning = u.ok_tokens.get("reasoning_tokens", 0)
    if u.mean_output_tokens >= DOWNGRADE_MAX_MEAN_OUTPUT_TOKENS or reasoning or window is None:
        return None
    if u.p99_input_tokens > window:
        return None
    savings = u.ok_cost_nanos - u.downgrade_cost_nanos
    if savings <= 0:
        return None
    return _item(
        "model_downgrade", u, savings,
        f"Use {alt.model_id} instead of {model.model_id} for {u.agent}",
        f"{u.agent}'s {u.ok_calls} successful calls to {model.model_id} in the last {WINDOW_DAYS} days had short "
        f"outputs (mean {u.mean_output_tokens:.0f} tokens) and no reasoning tokens; priced on {alt.model_id} "
        f"they would have cost {usd(u.downgrade_cost_nanos)} USD instead of {usd(u.ok_cost_nanos)} USD.",
        [f"Evaluate {alt.model_id} on a sample of {u.agent}'s prompts", f"Switch {u.agent} to {alt.model_id}",
         "Watch error rate and output quality for a week"],
        {"alternative": {"provider": alt.provider_id, "model": alt.model_id, "context_window": window},
         "mean_output_tokens": round(u.mean_output_tokens, 1), "p99_input_tokens": u.p99_input_tokens,
         "output_threshold_tokens": DOWNGRADE_MAX_MEAN_OUTPUT_TOKENS, "current_cost_usd": usd(u.ok_cost_nanos),
         "alternative_cost_usd": usd(u.downgrade_cost_nanos)},
    )  # fmt: skip


def caching(catalog: Catalog, u: Usage, today: date) -> dict[str, Any] | None:
    model, row = _rates(catalog, u, today)
    if row is None or u.ok_calls < CACHING_MIN_CALLS or u.active_days < CACHING_MIN_ACTIVE_DAYS:
        return None
    input_tokens = u.ok_tokens.get("input_tokens", 0)
    if input_tokens < CACHING_MIN_MEAN_INPUT_TOKENS * u.ok_calls:
        return None
    read_share = u.ok_tokens.get("cache_read_tokens", 0) / input_tokens
    rate_in, rate_read, rate_write = row.bands[0][0], row.bands[0][1], row.bands[0][2]
    if read_share > CACHING_MAX_READ_SHARE or rate_read >= rate_in:
        return None
    plain = atoms(u.ok_tokens)[0]
    per_write = CACHE_READS_PER_WRITE + 1
    exact = (
        Fraction(plain) * CACHEABLE_SHARE
        * (Fraction(CACHE_READS_PER_WRITE, per_write) * (rate_in - rate_read) - Fraction(1, per_write) * (rate_write - rate_in))
        / row.scale
    )  # fmt: skip
    savings = round_half_even(exact.numerator, exact.denominator) if exact > 0 else 0
    if savings <= 0:
        return None
    return _item(
        "prompt_caching", u, savings,
        f"Cache the prompt prefix of {u.agent}",
        f"{u.agent} sends large, steady input (mean {input_tokens // u.ok_calls} tokens per call on "
        f"{u.active_days} days) to {u.model} and reads {read_share:.1%} of it from cache.",
        ["Put the stable part of the prompt (system prompt, tools, documents) first",
         "Enable prompt caching (Anthropic: cache_control breakpoints; OpenAI: automatic above 1,024 tokens)",
         "Check cache_read_tokens rise in the dashboard"],
        {"cache_read_share": round(read_share, 4), "uncached_input_tokens": plain,
         "assumptions": {"cacheable_share_of_uncached_input": str(CACHEABLE_SHARE),
                         "cache_reads_per_write": CACHE_READS_PER_WRITE,
                         "prices": "the model's current catalog input, cache read and cache write prices"}},
    )  # fmt: skip


def batch(u: Usage) -> dict[str, Any] | None:
    model_provider = u.provider.lower()
    discount = BATCH_DISCOUNTS.get(model_provider)
    if discount is None or u.ok_calls < BATCH_MIN_CALLS:
        return None
    share = peak_share(u.hourly_calls)
    tagged = u.batch_tagged_calls * 2 >= u.calls
    if not tagged and share < BURST_MIN_CALL_SHARE:
        return None
    exact = Fraction(u.ok_cost_nanos) * Fraction(discount)
    savings = round_half_even(exact.numerator, exact.denominator)
    if savings <= 0:
        return None
    return _item(
        "batch_api", u, savings,
        f"Send {u.agent}'s traffic through the {u.provider} batch API",
        f"{u.agent}'s calls " + ("are tagged batch" if tagged else f"come in bursts ({share:.0%} of calls in the "
        f"busiest {BURST_TOP_HOURS_SHARE:.0%} of active hours)") + "; batch requests cost "
        f"{Decimal(discount) * 100:.0f}% less and answer within 24 hours.",
        ["Confirm the results are not needed interactively", "Queue the requests and submit them as a batch job"],
        {"peak_hour_share": round(share, 4), "batch_tagged_calls": u.batch_tagged_calls,
         "batch_discount": str(discount)},
    )  # fmt: skip


def long_context(u: Usage) -> dict[str, Any] | None:
    if not u.near_tier:
        return None
    calls, charged, lower = u.near_tier
    savings = charged - lower
    if calls == 0 or savings <= 0:
        return None
    return _item(
        "long_context_tier", u, savings,
        f"Keep {u.agent}'s prompts under {u.model}'s long-context price tier",
        f"{calls} calls had input just above a tier threshold of {u.model}'s price (within "
        f"{float(TIER_MARGIN):.0%}), so all their tokens paid the higher tier.",
        ["Trim or summarise context so the input stays under the threshold", "Split very long inputs"],
        {"calls_over_threshold": calls, "charged_usd": usd(charged), "one_tier_lower_usd": usd(lower),
         "margin": str(TIER_MARGIN)},
    )  # fmt: skip


def error_waste(u: Usage) -> dict[str, Any] | None:
    if u.error_cost_nanos <= 0:
        return None
    return _item(
        "error_waste", u, u.error_cost_nanos,
        f"Fix the failing calls of {u.agent}",
        f"{u.error_calls} of {u.calls} calls of {u.agent} to {u.model} ended with status error "
        f"and still cost {usd(u.error_cost_nanos)} USD.",
        ["Look at the error events (GET /v1/analytics/events)", "Retry with backoff only on transient errors",
         "Validate inputs before sending"],
        {"error_calls": u.error_calls, "error_rate": round(u.error_calls / u.calls, 4) if u.calls else 0.0},
    )  # fmt: skip


def _priority(kind: str, savings_nanos: int) -> str:
    score = savings_nanos / NANOS_PER_USD * EASE[kind]
    return "high" if score >= HIGH_SCORE_USD else "medium" if score >= MEDIUM_SCORE_USD else "low"


def recommend(usages: Iterable[Usage], catalog: Catalog, today: date) -> list[dict[str, Any]]:
    """Every recommendation, most savings first (ties by agent, project, type)."""
    usages = list(usages)
    agent_cost: dict[tuple[str, str], int] = {}
    for u in usages:
        agent_cost[(u.agent, u.project)] = agent_cost.get((u.agent, u.project), 0) + u.cost_nanos
    items = []
    for u in usages:
        # the successful calls' dollars go to one recommendation at most
        ok_kinds = [r for r in (downgrade(catalog, u), caching(catalog, u, today), batch(u), long_context(u)) if r]
        chosen = [max(ok_kinds, key=lambda r: r["estimated_savings_monthly_nanos"])] if ok_kinds else []
        if (waste := error_waste(u)) is not None:
            chosen.append(waste)
        for item in chosen:
            savings = item["estimated_savings_monthly_nanos"]
            total = agent_cost[(u.agent, u.project)]
            item["estimated_savings_percent"] = round(100 * savings / total, 2) if total else 0.0
            item["priority"] = _priority(item["type"], savings)
            if len(ok_kinds) > 1 and item["type"] != "error_waste":
                item["evidence"]["also_applicable"] = [r["type"] for r in ok_kinds if r is not item]
            items.append(item)
    items.sort(key=lambda r: (-r["estimated_savings_monthly_nanos"], r["agent"], r["project"], r["type"]))
    return items


def summary(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_type: dict[str, dict[str, Any]] = {}
    for kind in TYPES:
        chosen = [r["estimated_savings_monthly_nanos"] for r in items if r["type"] == kind]
        if chosen:
            by_type[kind] = {"count": len(chosen), "estimated_savings_monthly": usd(sum(chosen))}
    total = sum(r["estimated_savings_monthly_nanos"] for r in items)
    return {"total_estimated_savings_monthly": usd(total), "by_type": by_type, "count": len(items)}
