"""The anomaly stage's ClickHouse side: baselines from the aggregates, the tenants' rules
(``anomaly_settings``) and the episodes already alerted (``budget_alerts``). Sync
clickhouse-connect calls: the stage runs them in a worker thread.

Baselines come from ``usage_minute`` (cost, calls, tokens per tenant, project, agent, model and
minute), so a restarted stage, a new replica or a backfilled tenant has one at once: per hour of
the day, two queries read the minutes of that hour on the sample days of ``baseline.py`` for every
tenant, per agent and per project; each scope's first minute comes from ``usage_hourly``, which
also picks the scopes: per tenant the ``max_series_per_tenant`` agents, and as many projects,
with the most spend in the lookback (a tenant's millions of agent names cost a bounded read).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from spendstream.anomaly.baseline import (
    DAY_MS,
    HOUR_MS,
    Baseline,
    MinuteSample,
    seasonal_baseline,
    with_members,
)
from spendstream.anomaly.detector import Rule
from spendstream.money import INT64_AMOUNT
from spendstream.settings import AnomalySettings

#: (tenant, project, agent) -> baseline; agent "" is the whole project
Baselines = dict[tuple[str, str, str], Baseline]

#: each tenant's scopes with the most spend in the lookback, at most ``per_tenant`` of them: a
#: tenant with millions of agent names costs this query a bounded result, and the stage bounded memory
TOP_AGENTS_SQL = """
SELECT tenant, project, agent, min(bucket) AS first, sum(cost_nanos) AS spent
FROM usage_hourly
WHERE bucket >= {since:DateTime64(3, 'UTC')} AND bucket < {hour:DateTime64(3, 'UTC')}
GROUP BY tenant, project, agent
ORDER BY tenant, spent DESC
LIMIT {per_tenant:UInt32} BY tenant"""

TOP_PROJECTS_SQL = """
SELECT tenant, project, min(bucket) AS first, sum(cost_nanos) AS spent
FROM usage_hourly
WHERE bucket >= {since:DateTime64(3, 'UTC')} AND bucket < {hour:DateTime64(3, 'UTC')}
GROUP BY tenant, project
ORDER BY tenant, spent DESC
LIMIT {per_tenant:UInt32} BY tenant"""

_SAMPLE_MINUTES = """
WHERE bucket >= {since:DateTime64(3, 'UTC')} AND bucket < {hour:DateTime64(3, 'UTC')}
  AND toHour(bucket) = {hour_of_day:UInt8}
  AND (bucket >= {short_since:DateTime64(3, 'UTC')} OR toDayOfWeek(bucket) = {day_of_week:UInt8})"""

AGENT_MINUTES_SQL = f"""
SELECT tenant, project, agent, concat(provider, '/', model) AS model, bucket,
       toInt64(sum(cost_nanos)) AS cost, sum(calls) AS calls, sum(input_tokens + output_tokens) AS tokens
FROM usage_minute{_SAMPLE_MINUTES}
  AND (tenant, project, agent) IN (SELECT tenant, project, agent FROM ({TOP_AGENTS_SQL}))
GROUP BY tenant, project, agent, model, bucket"""

PROJECT_MINUTES_SQL = f"""
SELECT tenant, project, '' AS agent, concat(provider, '/', model) AS model, bucket,
       toInt64(sum(cost_nanos)) AS cost, sum(calls) AS calls, sum(input_tokens + output_tokens) AS tokens
FROM usage_minute{_SAMPLE_MINUTES}
  AND (tenant, project) IN (SELECT tenant, project FROM ({TOP_PROJECTS_SQL}))
GROUP BY tenant, project, model, bucket"""

RULES_SQL = """
SELECT tenant, enabled, score_threshold, min_ratio, min_excess_nanos, extreme_ratio, channels, muted
FROM anomaly_settings FINAL"""

EPISODES_SQL = """
SELECT tenant, alert_id, scope, details
FROM budget_alerts FINAL
WHERE kind = 'anomaly' AND fired_at >= {since:DateTime64(3, 'UTC')}"""


def _ms(t: datetime) -> int:
    t = t if t.tzinfo else t.replace(tzinfo=UTC)
    return int(t.timestamp() * 1000)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def default_rule(settings: AnomalySettings) -> Rule:
    return Rule(
        enabled=settings.enabled,
        score=settings.score_threshold,
        ratio=settings.min_ratio,
        min_excess_nanos=INT64_AMOUNT.nanos(settings.min_excess_usd),
        extreme_ratio=settings.extreme_ratio,
    )


def load_rules(client: Any) -> dict[str, Rule]:
    return {
        tenant: Rule(
            bool(enabled), float(score), float(ratio), int(excess), float(extreme), tuple(channels), tuple(muted)
        )  # fmt: skip
        for tenant, enabled, score, ratio, excess, extreme, channels, muted in client.query(RULES_SQL).result_rows
    }


@dataclass(frozen=True)
class OpenEpisode:
    tenant: str
    project: str
    agent: str
    start_ms: int
    alert_id: str


def load_episodes(client: Any, since_ms: int) -> list[OpenEpisode]:
    """The anomaly alerts fired since ``since_ms`` (their episodes may still be open)."""
    out: list[OpenEpisode] = []
    rows = client.query(EPISODES_SQL, parameters={"since": _dt(since_ms)}).result_rows
    for tenant, alert_id, scope, details in rows:
        try:
            start = orjson.loads(details)["episode_start"]
            start_ms = _ms(datetime.fromisoformat(start))
        except (ValueError, KeyError, TypeError):
            continue
        out.append(OpenEpisode(tenant, scope.get("project", ""), scope.get("agent", ""), start_ms, alert_id))
    return out


def load_baselines(client: Any, hour_start_ms: int, settings: AnomalySettings, rules: dict[str, Rule]) -> Baselines:
    """Every scope's baseline for the hour starting at ``hour_start_ms`` (per tenant, the
    ``max_series_per_tenant`` agents and as many projects with the most spend)."""
    since = hour_start_ms - settings.lookback_days * DAY_MS
    hour = _dt(hour_start_ms)
    params = {
        "since": _dt(since), "hour": hour, "hour_of_day": hour.hour, "per_tenant": settings.max_series_per_tenant,
        "short_since": _dt(hour_start_ms - settings.short_history_days * DAY_MS), "day_of_week": hour.isoweekday(),
    }  # fmt: skip
    first = [(t, p, a, f) for t, p, a, f, _ in client.query(TOP_AGENTS_SQL, parameters=params).result_rows]
    first += [(t, p, "", f) for t, p, f, _ in client.query(TOP_PROJECTS_SQL, parameters=params).result_rows]
    minute_rows = client.query(AGENT_MINUTES_SQL, parameters=params).result_rows
    minute_rows += client.query(PROJECT_MINUTES_SQL, parameters=params).result_rows
    return baselines_from_rows(first, minute_rows, hour_start_ms, settings, rules)


def baselines_from_rows(
    first_rows: Iterable[tuple[str, str, str, datetime]],
    minute_rows: Iterable[tuple[str, str, str, str, datetime, int, int, int]],
    hour_start_ms: int,
    settings: AnomalySettings,
    rules: dict[str, Rule],
) -> Baselines:
    """Baselines from each scope's first minute and its minutes of the sample hours (agent ""
    rows: the whole project)."""
    first = {(tenant, project, agent): _ms(t) for tenant, project, agent, t in first_rows}
    minutes: dict[tuple[str, str, str], dict[int, MinuteSample]] = {}
    for tenant, project, agent, model, bucket, cost, calls, tokens in minute_rows:
        ms = _ms(bucket)
        key = (tenant, project, agent)
        sample = minutes.setdefault(key, {}).get(ms)
        if sample is None:
            sample = minutes[key][ms] = MinuteSample()
        sample.cost += int(cost)
        sample.calls += int(calls)
        sample.tokens += int(tokens)
        sample.models[model] = sample.models.get(model, 0) + int(cost)
    defaults = default_rule(settings)
    out: Baselines = {}
    for key, first_ms in first.items():
        rule = rules.get(key[0], defaults)
        baseline = seasonal_baseline(
            minutes.get(key, {}), hour_start_ms, first_ms, lookback_days=settings.lookback_days,
            short_days=settings.short_history_days, score=rule.score, ratio=rule.ratio,
            min_samples=settings.min_history_minutes,
        )  # fmt: skip
        if baseline is not None:
            out[key] = baseline
    members: dict[tuple[str, str], list[Baseline]] = {}
    for (tenant, project, agent), baseline in out.items():
        if agent:
            members.setdefault((tenant, project), []).append(baseline)
    for (tenant, project, agent), baseline in list(out.items()):
        if not agent and (tenant, project) in members:
            out[(tenant, project, agent)] = with_members(baseline, members[(tenant, project)])
    return out


def hour_of(ms: int) -> int:
    return ms - ms % HOUR_MS
