"""ClickHouse side of re-pricing: blocking calls on a clickhouse-connect client (run them in a
worker thread from async code).

Reading is bounded: :func:`scan` pages through the scope's original rows in the table's key order
(``timestamp, event_id`` within the tenant), ``batch_events`` at a time from a cursor, and reads
each batch's current state (original + corrections) with one GROUP BY over that batch's key range.
Writing is the sink's way of being exactly once: each batch of correction rows is one insert into
``usage_events`` with ``insert_deduplication_token`` and
``deduplicate_blocks_in_dependent_materialized_views = 1``, so a batch sent again (a job retried
after a crash) is a no-op in usage_events and in every aggregate its views fill.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from spendstream.contracts import COST_CLASSES, TOKEN_FIELDS
from spendstream.repricing.planner import ATTRIBUTION, COST_COLUMNS, REPRICED, ROW_COLUMNS, Scope, StoredEvent

#: the cursor before every event
START = (datetime(1970, 1, 1, tzinfo=UTC), "")
INSERT_SETTINGS = {"insert_deduplicate": 1, "deduplicate_blocks_in_dependent_materialized_views": 1}
#: newest row of an event last: the original, then each job's reversal before its re-priced row
#: (job ids sort by creation time, see jobs.new_job_id)
_NEWEST = f"(correction_kind != '', correction_id, correction_kind = '{REPRICED}')"
_ORIGINAL = "correction_kind = ''"


def _conditions(scope: Scope) -> str:
    conds = [
        "tenant = {tenant:String}",
        "timestamp >= {start:DateTime64(3, 'UTC')}",
        "timestamp < {end:DateTime64(3, 'UTC')}",
    ]
    conds += [f"{name} = {{{name}:String}}" for name in scope.filters()]
    return " AND ".join(conds)


def _params(scope: Scope) -> dict[str, Any]:
    return {"tenant": scope.tenant, "start": scope.start, "end": scope.end, **scope.filters()}


_AFTER = "(timestamp, event_id) > ({after_ts:DateTime64(3, 'UTC')}, {after_id:String}) AND timestamp >= {after_ts:DateTime64(3, 'UTC')}"
_UNTIL = "(timestamp, event_id) <= ({until_ts:DateTime64(3, 'UTC')}, {until_id:String}) AND timestamp <= {until_ts:DateTime64(3, 'UTC')}"

#: each column of an event's current state, aliased ``s_<name>`` (an alias equal to a column name
#: would replace that column in WHERE and in the other aggregates)
_STATE_COLUMNS = (
    [f"anyIf({c}, {_ORIGINAL}) AS s_{c}" for c in ATTRIBUTION if c not in ("event_id", "timestamp")]
    + [f"anyIf({c}, {_ORIGINAL}) AS s_{c}" for c in TOKEN_FIELDS]
    + [f"sum({c}) AS s_{c}" for c in ("cost_nanos", *COST_COLUMNS.values())]
    + [f"argMax({c}, {_NEWEST}) AS s_{c}" for c in ("price_id", "pricing_status", "price_source")]
    # a job resumed after a crash finds the events it already corrected: their cost before it
    + [
        "countIf(correction_id = {job:String}) > 0 AS s_by_job",
        "-sumIf(cost_nanos, correction_id = {job:String} AND correction_kind = 'reversal') AS s_before_job",
    ]
)


def scan(
    client: Client, scope: Scope, batch_events: int, after: tuple[datetime, str] = START, job_id: str = ""
) -> Iterator[tuple[tuple[datetime, str], list[StoredEvent]]]:
    """(cursor after the batch, the batch's events in their current state), batch after batch.
    ``job_id``: events this job corrected already say so (``StoredEvent.before_job``)."""
    where = _conditions(scope)
    params = {**_params(scope), "job": job_id or "-"}
    while True:
        bound = {"after_ts": after[0], "after_id": after[1]}
        last = client.query(
            f"SELECT timestamp, event_id FROM usage_events WHERE {where} AND {_ORIGINAL} AND {_AFTER} "
            f"ORDER BY timestamp, event_id LIMIT 1 OFFSET {int(batch_events) - 1}",
            parameters={**params, **bound},
        ).result_rows
        until = ""
        if last:
            until = f" AND {_UNTIL}"
            bound |= {"until_ts": last[0][0], "until_id": last[0][1]}
        result = client.query(
            f"SELECT event_id AS s_event_id, timestamp AS s_timestamp, {', '.join(_STATE_COLUMNS)} FROM usage_events "
            f"WHERE {where} AND {_AFTER}{until} GROUP BY timestamp, event_id HAVING countIf({_ORIGINAL}) = 1 "
            "ORDER BY s_timestamp, s_event_id",
            parameters={**params, **bound},
        )
        events = [_stored({k.removeprefix("s_"): v for k, v in row.items()}) for row in result.named_results()]
        if not events:
            return
        after = (events[-1].attribution["timestamp"], events[-1].attribution["event_id"])
        yield after, events
        if not last:
            return


def _stored(row: dict[str, Any]) -> StoredEvent:
    timestamp = row["timestamp"]
    row["timestamp"] = timestamp.replace(tzinfo=UTC) if timestamp.tzinfo is None else timestamp
    return StoredEvent(
        attribution={c: row[c] for c in ATTRIBUTION},
        tokens={t: int(row[t]) for t in TOKEN_FIELDS},
        cost={c: int(row[COST_COLUMNS[c]]) for c in COST_CLASSES},
        cost_nanos=int(row["cost_nanos"]),
        price_id=row["price_id"],
        pricing_status=row["pricing_status"],
        price_source=row["price_source"],
        before_job=int(row["before_job"]) if row["by_job"] else None,
    )


def insert_corrections(client: Client, rows: list[dict[str, Any]], token: str) -> None:
    """One batch's correction rows as one insert into usage_events, deduplicated by ``token``."""
    if rows:
        client.insert(
            "usage_events",
            [[r[c] for c in ROW_COLUMNS] for r in rows],
            column_names=list(ROW_COLUMNS),
            settings={**INSERT_SETTINGS, "insert_deduplication_token": token},
        )


def override_rows(client: Client, tenant: str) -> list[dict[str, Any]]:
    """The tenant's current price_overrides rows, as the pricing stage reads them."""
    rows = list(
        client.query(
            "SELECT * FROM price_overrides FINAL WHERE tenant = {tenant:String} AND deleted = 0",
            parameters={"tenant": tenant},
        ).named_results()
    )
    for row in rows:
        row.setdefault("per_request_usd", row.get("request_usd"))
    return rows


# --- jobs and audit -------------------------------------------------------------------------------

RUNNING, DONE, FAILED = "running", "done", "failed"
#: a trigger's dry run waiting for confirmation (POST /v1/pricing/reprice with its job_id)
PROPOSED = "proposed"


@dataclass(frozen=True)
class Job:
    tenant: str
    id: str
    actor: str
    reason: str
    scope: dict[str, Any]
    status: str = RUNNING
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    cursor: tuple[datetime, str] = START
    batches: int = 0
    diff: dict[str, Any] | None = None
    error: str = ""

    def describe(self) -> dict[str, Any]:
        diff = self.diff or {}
        return {
            "id": self.id,
            "status": self.status,
            "actor": self.actor,
            "reason": self.reason,
            "scope": self.scope,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "progress": {
                "batches": self.batches,
                "events_scanned": diff.get("events_scanned", 0),
                "events_changed": diff.get("events_changed", 0),
                "cursor": {"timestamp": self.cursor[0].isoformat(), "event_id": self.cursor[1]},
            },
            "diff": public_diff(self.diff) if self.diff is not None else None,
            "error": self.error or None,
        }


def public_diff(diff: dict[str, Any]) -> dict[str, Any]:
    """A diff as the API answers it (budget_seq is internal: spendstream/repricing/budgets.py)."""
    return {k: v for k, v in diff.items() if k != "budget_seq"}


_JOB_COLUMNS = [
    "tenant", "id", "status", "actor", "reason", "scope", "created_at", "updated_at", "cursor_ts", "cursor_event_id",
    "batches", "events_scanned", "events_changed", "old_nanos", "new_nanos", "diff", "error", "version",
]  # fmt: skip


def save_job(client: Client, job: Job) -> Job:
    job = replace(job, updated_at=datetime.now(UTC))
    diff = job.diff or {}
    client.insert(
        "reprice_jobs",
        [[
            job.tenant, job.id, job.status, job.actor, job.reason, json.dumps(job.scope), job.created_at,
            job.updated_at, job.cursor[0], job.cursor[1], job.batches, diff.get("events_scanned", 0),
            diff.get("events_changed", 0), diff.get("old_nanos", 0), diff.get("new_nanos", 0),
            json.dumps(diff) if job.diff is not None else "", job.error, time.time_ns() // 1000,
        ]],
        column_names=_JOB_COLUMNS,
    )  # fmt: skip
    return job


def _job(row: dict[str, Any]) -> Job:
    def utc(t: datetime) -> datetime:
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t

    return Job(
        tenant=row["tenant"],
        id=row["id"],
        actor=row["actor"],
        reason=row["reason"],
        scope=json.loads(row["scope"]),
        status=row["status"],
        created_at=utc(row["created_at"]),
        updated_at=utc(row["updated_at"]),
        cursor=(utc(row["cursor_ts"]), row["cursor_event_id"]),
        batches=int(row["batches"]),
        diff=json.loads(row["diff"]) if row["diff"] else None,
        error=row["error"],
    )


def load_job(client: Client, tenant: str, job_id: str) -> Job | None:
    rows = list(
        client.query(
            f"SELECT {', '.join(_JOB_COLUMNS)} FROM reprice_jobs FINAL WHERE tenant = {{tenant:String}} AND id = {{id:String}}",
            parameters={"tenant": tenant, "id": job_id},
        ).named_results()
    )
    return _job(rows[0]) if rows else None


def list_jobs(client: Client, tenant: str, status: str | None = None, limit: int = 100) -> list[Job]:
    cond = " AND status = {status:String}" if status else ""
    return [
        _job(row)
        for row in client.query(
            f"SELECT {', '.join(_JOB_COLUMNS)} FROM reprice_jobs FINAL WHERE tenant = {{tenant:String}}{cond} "
            f"ORDER BY created_at DESC LIMIT {int(limit)}",
            parameters={"tenant": tenant, "status": status or ""},
        ).named_results()
    ]


def audit(client: Client, job: Job, status: str) -> None:
    diff = job.diff or {}
    client.insert(
        "pricing_audit",
        [[
            job.tenant, datetime.now(UTC), job.id, status, job.actor, job.reason, json.dumps(job.scope),
            diff.get("events_changed", 0), diff.get("old_nanos", 0), diff.get("new_nanos", 0),
        ]],
        column_names=["tenant", "at", "job_id", "status", "actor", "reason", "scope", "events_changed", "old_nanos", "new_nanos"],
    )  # fmt: skip


def read_audit(client: Client, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
    result = client.query(
        "SELECT at, job_id, status, actor, reason, scope, events_changed, old_nanos, new_nanos FROM pricing_audit "
        f"WHERE tenant = {{tenant:String}} ORDER BY at DESC, job_id LIMIT {int(limit)}",
        parameters={"tenant": tenant},
    )
    return [
        {
            **row,
            "at": row["at"].replace(tzinfo=UTC).isoformat() if row["at"].tzinfo is None else row["at"].isoformat(),
            "scope": json.loads(row["scope"]),
            "old_nanos": int(row["old_nanos"]),
            "new_nanos": int(row["new_nanos"]),
        }
        for row in result.named_results()
    ]
