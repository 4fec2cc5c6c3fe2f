"""A tenant's spend anomaly settings (the anomaly stage's alert rule and channels).

GET returns the tenant's settings, or the defaults (``anomaly.*`` settings) when it has none;
PUT replaces them whole (a new ``anomaly_settings`` row with a higher version). The anomaly stage
re-reads them every ``anomaly.baseline_reload_s``. See docs/anomaly.md.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator

from query_api.deps import CH, Principal, SettingsDep, require
from query_api.errors import InvalidField
from query_api.routers.budgets import MAX_CHANNELS, _check_channels
from spendstream.alerting import channel_refusal
from spendstream.anomaly.store import RULES_SQL
from spendstream.contracts import nanos_to_usd_str
from spendstream.money import INT64_AMOUNT, MoneyError

router = APIRouter(prefix="/v1/anomaly-settings", tags=["anomaly"])

Reader = Annotated[Principal, Depends(require("read"))]
Admin = Annotated[Principal, Depends(require("admin"))]

MAX_MUTED = 1_000
COLUMNS = ["tenant", "enabled", "score_threshold", "min_ratio", "min_excess_nanos", "extreme_ratio", "channels",
           "muted", "updated_at", "version"]  # fmt: skip


class AnomalySettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="detect and alert for this tenant")
    score_threshold: float = Field(6.0, ge=1, le=1000, description="robust score a window of 1-10 minutes must reach")
    min_ratio: float = Field(3.0, ge=1.1, le=10_000, description="a window's spend / its usual spend must reach this")
    min_excess_usd: str = Field("1", max_length=40, description="USD the alerting window must exceed its usual by")
    extreme_ratio: float = Field(
        20.0, ge=1.1, le=1_000_000, description="a minute this far above its usual alerts alone"
    )
    channels: list[str] = Field(default_factory=list, max_length=MAX_CHANNELS,
                                description="webhook ids and e-mail addresses")  # fmt: skip
    muted: list[str] = Field(default_factory=list, max_length=MAX_MUTED,
                             description='scopes that never alert: "project" or "project/agent"')  # fmt: skip

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[str]) -> list[str]:
        for channel in v:
            if not channel.strip() or len(channel) > 256:
                raise ValueError("each channel is a webhook id or an e-mail address (1..256 characters)")
            refusal = channel_refusal(channel.strip(" "))
            if refusal:
                raise ValueError(f"channel {channel!r}: {refusal}")
        return list(dict.fromkeys(c.strip() for c in v))

    @field_validator("muted")
    @classmethod
    def _muted(cls, v: list[str]) -> list[str]:
        for scope in v:
            if not scope or len(scope) > 257 or any(ord(c) < 32 for c in scope):
                raise ValueError('each muted scope is "project" or "project/agent" (1..257 characters)')
        return list(dict.fromkeys(v))


def _view(row: dict[str, Any], defaults: bool) -> dict[str, Any]:
    return {
        "enabled": bool(row["enabled"]),
        "score_threshold": row["score_threshold"],
        "min_ratio": row["min_ratio"],
        "min_excess_usd": nanos_to_usd_str(row["min_excess_nanos"]),
        "extreme_ratio": row["extreme_ratio"],
        "channels": list(row["channels"]),
        "muted": list(row["muted"]),
        "defaults": defaults,
    }


@router.get("", summary="The tenant's anomaly settings (the defaults until it sets its own)")
async def get_settings(principal: Reader, ch: CH, settings: SettingsDep) -> dict:
    rows = list(
        (
            await ch.query(RULES_SQL + " WHERE tenant = {tenant:String}", parameters={"tenant": principal.tenant})
        ).named_results()
    )
    if rows:
        return _view(rows[0], defaults=False)
    a = settings.anomaly
    return _view({
        "enabled": a.enabled, "score_threshold": a.score_threshold, "min_ratio": a.min_ratio,
        "min_excess_nanos": INT64_AMOUNT.nanos(a.min_excess_usd), "extreme_ratio": a.extreme_ratio,
        "channels": [], "muted": [],
    }, defaults=True)  # fmt: skip


@router.put("", summary="Replace the tenant's anomaly settings")
async def put_settings(body: AnomalySettingsIn, principal: Admin, ch: CH) -> dict:
    try:
        excess = INT64_AMOUNT.nanos(body.min_excess_usd, "min_excess_usd")
    except MoneyError as exc:
        raise InvalidField("min_excess_usd", str(exc)) from None
    if excess < 0:
        raise InvalidField("min_excess_usd", "must not be negative")
    await _check_channels(ch, principal.tenant, tuple(body.channels))
    row = {
        "tenant": principal.tenant, "enabled": int(body.enabled), "score_threshold": body.score_threshold,
        "min_ratio": body.min_ratio, "min_excess_nanos": excess, "extreme_ratio": body.extreme_ratio,
        "channels": body.channels, "muted": body.muted, "updated_at": datetime.now(UTC),
        "version": time.time_ns() // 1000,
    }  # fmt: skip
    await ch.insert("anomaly_settings", [[row[c] for c in COLUMNS]], column_names=COLUMNS)
    return _view(row, defaults=False)
