"""Budgets in ClickHouse: the ``budgets`` table (configs, written by the query API, polled by the
budgets stage and the gateway's budget check) and ``budget_alerts`` (the alert history, written
by the budgets stage). Row mapping, and the sync reads and writes.

Sync clickhouse-connect calls: the budgets stage and the gateway run them in worker threads (the
query API writes the same rows through its async client). ClickHouse ``budgets`` is the durable
source of truth (the embedded broker keeps nothing across a restart), so readers poll it every
``settings.budgets.reload_s`` instead of following a config topic; a change is live
everywhere within about that period.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from spendstream.budgets.model import Budget
from spendstream.budgets.scopes import ScopeIndex
from spendstream.clickhouse import get_client
from spendstream.settings import Settings

# ---------------------------------------------------------------- budgets

#: budgets table scope columns <-> scope fields
SCOPE_COLUMNS = {f: f"scope_{f}" for f in ("project", "agent", "user", "provider", "model")}


def scope_columns(scope: Mapping[str, str]) -> dict[str, str]:
    cols = {col: scope.get(f, "") for f, col in SCOPE_COLUMNS.items()}
    tag_key, _, tag_value = scope.get("tag", "").partition("=")
    cols["scope_tag_key"], cols["scope_tag_value"] = tag_key, tag_value
    return cols


def scope_from_columns(row: Mapping[str, Any]) -> dict[str, str]:
    scope = {f: row[col] for f, col in SCOPE_COLUMNS.items() if row[col]}
    if row["scope_tag_key"]:
        scope["tag"] = f"{row['scope_tag_key']}={row['scope_tag_value']}"
    return scope


def budget_from_row(row: Mapping[str, Any]) -> Budget:
    """A ``budgets`` table row (clickhouse-connect named result) -> Budget."""
    return Budget(
        tenant=row["tenant"],
        id=row["id"],
        name=row["name"],
        scope=scope_from_columns(row),
        window=row["window"],
        timezone=row["timezone"],
        limit_nanos=int(row["limit_nanos"]),
        thresholds=tuple(sorted(Decimal(t).normalize() for t in row["thresholds"])),
        forecast=bool(row["forecast"]),
        channels=tuple(row["channels"]),
        enforce=bool(row["enforce"]),
    )


BUDGET_COLUMNS = (
    "tenant", "id", "name", "scope_project", "scope_agent", "scope_user", "scope_provider", "scope_model",
    "scope_tag_key", "scope_tag_value", "window", "timezone", "limit_nanos", "thresholds", "forecast", "channels",
    "enforce", "created_at", "updated_at", "deleted", "version",
)  # fmt: skip


def budget_row(
    budget: Budget, created_at: datetime, updated_at: datetime, version: int, deleted: bool = False
) -> list[Any]:
    """A ``budgets`` row in BUDGET_COLUMNS order (a change inserts the whole row with a higher version)."""
    cols = scope_columns(budget.scope)
    return [
        budget.tenant, budget.id, budget.name, *(cols[c] for c in BUDGET_COLUMNS[3:10]), budget.window,
        budget.timezone, budget.limit_nanos, list(budget.thresholds), budget.forecast, list(budget.channels),
        budget.enforce, created_at, updated_at, int(deleted), version,
    ]  # fmt: skip


BUDGETS_SQL = "SELECT * FROM budgets FINAL WHERE deleted = 0"
#: changes whenever a row is written (every create, change and delete inserts one) and when rows
#: are merged away; equal fingerprints mean the live set is unchanged
FINGERPRINT_SQL = "SELECT count(), sum(cityHash64(tenant, id, version)) FROM budgets"


def load_budgets(client: Any) -> list[Budget]:
    return [budget_from_row(row) for row in client.query(BUDGETS_SQL).named_results()]


def budgets_fingerprint(client: Any) -> tuple[int, int]:
    """A cheap check before ``load_budgets``: pollers skip the full read (and rebuilding their
    scope index) while it is unchanged."""
    count, digest = client.query(FINGERPRINT_SQL).result_rows[0]
    return int(count), int(digest)


class BudgetReader:
    """The live budgets for a poller (the budgets stage, the gateway's budget check), read only
    when their fingerprint changed. Sync: call it from a worker thread. The ClickHouse client is
    replaced after any error."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._client: Any = None
        self._fingerprint: tuple[int, int] | None = None

    def read_if_changed(self) -> ScopeIndex | None:
        """A new index of the live budgets, or None when nothing changed since the last read."""
        if self._client is None:
            self._client = get_client(self._settings)
        try:
            # read before the budgets: a change in between costs one more read, never a missed one
            fingerprint = budgets_fingerprint(self._client)
            if fingerprint == self._fingerprint:
                return None
            index = ScopeIndex(load_budgets(self._client))
        except Exception:
            self.close()
            raise
        self._fingerprint = fingerprint
        return index

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def insert_budget(client: Any, budget: Budget, version: int) -> None:
    """Create or replace ``budget`` (sync client; tests and tools)."""
    now = datetime.now(UTC)
    client.insert("budgets", [budget_row(budget, now, now, version)], column_names=list(BUDGET_COLUMNS))


# ---------------------------------------------------------------- budget_alerts

ALERT_COLUMNS = (
    "tenant", "alert_id", "kind", "budget_id", "budget_name", "scope", "window_start", "window_end", "threshold",
    "spent_nanos", "limit_nanos", "percent_used", "projected_nanos", "projected_at", "event_id", "top", "fired_at", "details",
)  # fmt: skip


def _instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).astimezone(UTC)


def alert_row(value: dict[str, Any]) -> list[Any]:
    """A budget.alerts value (contracts.py) -> a ``budget_alerts`` row in ALERT_COLUMNS order."""
    return [
        value["tenant"], value["alert_id"], value["kind"], value["budget_id"], value["budget_name"], value["scope"],
        _instant(value["window_start"]), _instant(value["window_end"]), Decimal(value["threshold"] or 0),
        value["spent_nanos"], value["limit_nanos"], Decimal(value["percent_used"]), value["projected_nanos"],
        _instant(value["projected_at"]), value["event_id"], orjson.dumps(value["top"]).decode(),
        _instant(value["created_at"]),
        # an anomaly alert's explanation (kind "anomaly"); '' for budget alerts
        orjson.dumps(value["anomaly"]).decode() if value.get("anomaly") else "",
    ]  # fmt: skip


def insert_alerts(client: Any, values: list[dict[str, Any]]) -> None:
    """Idempotent: a re-sent alert has the same (tenant, alert_id), collapsed by ReplacingMergeTree."""
    client.insert("budget_alerts", [alert_row(v) for v in values], column_names=list(ALERT_COLUMNS))
