"""Reconciliation: what the providers report (``provider_costs_daily``, ``provider_usage_hourly``,
each bucket's current collection, live connections only) next to what Spendstream counted
(``usage_daily``), per UTC day, provider and model (or project).

``merge`` is pure: it joins the three sides on (date, provider, key) and computes the difference
(reported - tracked, exact nano-USD) and the drift (difference / reported, in %, 2 places, half
even; null when nothing was reported). A row seen on one side only says so (``seen_by``): spend the
provider reports that Spendstream never saw (other teams, the console, a forgotten key) is
``unattributed_cost_usd``. Model names are compared as the gateway stores them (trimmed, lower
case) on both sides. ``by=project`` maps the providers' project / workspace ids to Spendstream
project names through each connection's ``project_map`` (an id it does not map is shown as is).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from spendstream.collectors import store
from spendstream.collectors.registry import PROVIDERS
from spendstream.money import format_usd

GROUPINGS = {"model": ("model", "model"), "project": ("project", "project_id")}  # by -> (tracked col, reported col)
MAX_DAYS = 366


@dataclass(frozen=True, slots=True)
class Side:
    """One side's figures of one (date, provider, key)."""

    cost_nanos: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def drift_pct(difference_nanos: int, reported_nanos: int) -> str | None:
    if reported_nanos == 0:
        return None
    pct = (Decimal(difference_nanos) * 100 / Decimal(reported_nanos)).quantize(Decimal("0.01"), ROUND_HALF_EVEN)
    return str(pct)


def merge(
    by: str,
    tracked: dict[tuple[date, str, str], Side],
    reported_cost: dict[tuple[date, str, str], int],
    reported_tokens: dict[tuple[date, str, str], tuple[int, int]],
) -> dict[str, Any]:
    """The answer of ``GET /v1/reconciliation``: ``rows`` per (date, provider, key) and ``days``
    totals per (date, provider)."""
    keys = sorted(set(tracked) | set(reported_cost) | set(reported_tokens))
    rows, days = [], {}
    for key in keys:
        day, provider, name = key
        t = tracked.get(key, Side())
        r_cost = reported_cost.get(key, 0)
        r_in, r_out = reported_tokens.get(key, (0, 0))
        reported_seen = key in reported_cost or key in reported_tokens
        seen_by = (
            "both" if key in tracked and reported_seen else ("spendstream_only" if key in tracked else "provider_only")
        )
        diff = r_cost - t.cost_nanos
        rows.append({
            "date": day.isoformat(), "provider": provider, by: name,
            "tracked_cost_usd": format_usd(t.cost_nanos), "reported_cost_usd": format_usd(r_cost),
            "difference_usd": format_usd(diff), "drift_pct": drift_pct(diff, r_cost),
            "tracked_input_tokens": t.input_tokens, "reported_input_tokens": r_in,
            "tracked_output_tokens": t.output_tokens, "reported_output_tokens": r_out,
            "unattributed_cost_usd": format_usd(max(diff, 0)), "seen_by": seen_by,
        })  # fmt: skip
        total = days.setdefault((day, provider), [0, 0, 0])
        total[0] += t.cost_nanos
        total[1] += r_cost
        total[2] += max(diff, 0)
    totals = [
        {"date": d.isoformat(), "provider": p, "tracked_cost_usd": format_usd(t), "reported_cost_usd": format_usd(r),
         "difference_usd": format_usd(r - t), "drift_pct": drift_pct(r - t, r), "unattributed_cost_usd": format_usd(u)}
        for (d, p), (t, r, u) in sorted(days.items())
    ]  # fmt: skip
    return {"rows": rows, "days": totals}


def _day(value: Any) -> date:
    return value.date() if isinstance(value, datetime) else value


def query(client: Any, tenant: str, start: datetime, end: datetime, by: str) -> dict[str, Any]:
    """Read both sides from ClickHouse (sync client) for UTC days in [start, end) and merge them."""
    tracked_col, reported_col = GROUPINGS[by]
    params = {"tenant": tenant, "start": start, "end": end, "providers": list(PROVIDERS)}
    span = "bucket_start >= {start:DateTime64(3, 'UTC')} AND bucket_start < {end:DateTime64(3, 'UTC')}"
    tracked_rows = client.query(
        f"SELECT toDate(bucket) AS d, provider, lower(trim(BOTH ' ' FROM {tracked_col})) AS k, sum(cost_nanos), "
        "sum(input_tokens), sum(output_tokens) FROM usage_daily WHERE tenant = {tenant:String} "
        "AND bucket >= {start:DateTime64(3, 'UTC')} AND bucket < {end:DateTime64(3, 'UTC')} "
        "AND provider IN {providers:Array(String)} GROUP BY d, provider, k",
        parameters=params,
    ).result_rows
    cost_rows = client.query(
        f"SELECT toDate(bucket_start) AS d, provider, connection_id, {reported_col} AS k, sum(amount_nanos) "
        f"FROM {store.latest(store.COSTS_TABLE)} WHERE {span} AND NOT (row_index = 0 AND amount_nanos = 0 AND k = '') "
        "GROUP BY d, provider, connection_id, k",
        parameters=params,
    ).result_rows
    token_rows = client.query(
        f"SELECT toDate(bucket_start) AS d, provider, connection_id, {reported_col} AS k, sum(input_tokens), "
        f"sum(output_tokens) FROM {store.latest(store.USAGE_TABLE)} WHERE {span} "
        "AND NOT (row_index = 0 AND input_tokens = 0 AND output_tokens = 0 AND k = '') "
        "GROUP BY d, provider, connection_id, k",
        parameters=params,
    ).result_rows
    maps: dict[str, dict[str, str]] = {}
    if by == "project":  # provider project / workspace ids -> Spendstream projects, per connection
        maps = dict(
            client.query(
                "SELECT id, project_map FROM provider_connections FINAL WHERE tenant = {tenant:String}",
                parameters=params,
            ).result_rows
        )

    def key(d: Any, provider: str, connection_id: str, k: str) -> tuple[date, str, str]:
        return _day(d), provider, maps.get(connection_id, {}).get(k, k)

    tracked = {(_day(d), p, k): Side(int(c), int(i), int(o)) for d, p, k, c, i, o in tracked_rows}
    reported_cost: dict[tuple[date, str, str], int] = {}
    for d, p, cid, k, c in cost_rows:
        at = key(d, p, cid, k)
        reported_cost[at] = reported_cost.get(at, 0) + int(c)
    reported_tokens: dict[tuple[date, str, str], tuple[int, int]] = {}
    for d, p, cid, k, i, o in token_rows:
        at = key(d, p, cid, k)
        before = reported_tokens.get(at, (0, 0))
        reported_tokens[at] = (before[0] + int(i), before[1] + int(o))
    return merge(by, tracked, reported_cost, reported_tokens)
