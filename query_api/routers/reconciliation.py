"""Reconciliation (read): per UTC day, provider and model (or project), what Spendstream counted
next to what the providers' admin APIs report, with the difference, the drift and the spend seen
on one side only (spendstream/collectors/reconcile.py; docs/collectors.md)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request

from query_api.deps import Reader
from query_api.errors import InvalidField
from spendstream.collectors.reconcile import GROUPINGS, MAX_DAYS, query

router = APIRouter(prefix="/v1/reconciliation", tags=["reconciliation"])


def _date(name: str, value: str) -> date:
    try:
        day = date.fromisoformat(value.strip()) if len(value) <= 10 else None
    except ValueError:
        day = None
    if day is None or not 1970 <= day.year <= 2299:
        raise InvalidField(name, f"expected a date YYYY-MM-DD (1970..2299), got {value[:32]!r}")
    return day


@router.get("", summary="Tracked (Spendstream) vs reported (provider) tokens and cost per day")
async def reconciliation(
    principal: Reader,
    request: Request,
    from_: Annotated[
        str | None, Query(alias="from", description="first UTC day, YYYY-MM-DD; default: 29 days before `to`")
    ] = None,
    to: Annotated[str | None, Query(description="last UTC day (inclusive), YYYY-MM-DD; default: today")] = None,
    granularity: Annotated[str, Query(description="'day' (the only one)")] = "day",
    by: Annotated[str, Query(description="'model' or 'project'")] = "model",
) -> dict:
    if granularity != "day":
        raise InvalidField("granularity", "only 'day' is supported")
    if by not in GROUPINGS:
        raise InvalidField("by", f"must be one of {', '.join(GROUPINGS)}")
    last = _date("to", to) if to else datetime.now(UTC).date()
    first = _date("from", from_) if from_ else last - timedelta(days=29)
    if first > last:
        raise InvalidField("from", "'from' must not be after 'to'")
    if (last - first).days >= MAX_DAYS:
        raise InvalidField("from", f"at most {MAX_DAYS} days at once")
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    answer = await asyncio.to_thread(query, request.app.state.ch_sync, principal.tenant, start, end, by)
    return {"from": first.isoformat(), "to": last.isoformat(), "granularity": "day", "by": by, **answer}
