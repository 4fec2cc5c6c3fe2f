"""Alert channels of a tenant: webhooks (generic signed JSON, Slack, PagerDuty) and e-mail.

The accepted formats, their validation and their masking are the channel registry's
(``spendstream/alerting/channels``): a new channel type needs nothing here.

A webhook URL is checked against SSRF when it is created (http/https only, no credentials, and
every address the host resolves to must be public unless ``notify.webhook.allow_private``);
the notify stage checks it again before every delivery (DNS may change). Secrets are never
returned, except a generated signing secret, once, in the creation response.

An e-mail channel is exactly one plain address (``alerting.targets.email_refusal``): a list, a display name
or a line break would add recipients or headers to every alert mail. No field may hold control
characters; the notify stage checks again when it sends (rows stored before these rules).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from query_api.deps import CH, Principal, SettingsDep, require
from query_api.errors import InvalidField, NotFound
from spendstream.alerting import (
    CHANNEL_FORMATS,
    Channel,
    ChannelRefused,
    ChannelRequest,
    NewChannel,
    deliver_test_alert,
    masked_channel,
    validate_channel,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

Reader = Annotated[Principal, Depends(require("read"))]
Admin = Annotated[Principal, Depends(require("admin"))]

_COLUMNS = ("id", "format", "url", "email", "secret", "created_at", "updated_at")
_WRITE_COLUMNS = ["tenant", "id", "format", "url", "email", "secret", "created_at", "updated_at", "deleted", "version"]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, max_length=2048, description="http(s) URL; PagerDuty defaults to the Events API v2")
    format: Literal[CHANNEL_FORMATS] | None = Field(  # type: ignore[valid-type] - the registry's names
        None, description="default: generic for a url, email for an email"
    )
    secret: str | None = Field(
        None,
        min_length=8,
        max_length=512,
        description="generic: HMAC-SHA256 signing key (generated and returned once when absent); "
        "pagerduty: the integration's routing key",
    )
    email: str | None = Field(None, max_length=254, description="an e-mail channel instead of a URL")


def _iso(t: datetime) -> str:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).isoformat(timespec="milliseconds")


def _channel(row: dict[str, Any]) -> Channel:
    return Channel(row["id"], row["format"], url=row["url"], email=row["email"], secret=row["secret"])


def _view(row: dict[str, Any]) -> dict[str, Any]:
    shown = masked_channel(_channel(row))
    return {
        "id": row["id"],
        "format": row["format"],
        "url": shown["url"],
        "email": shown["email"],
        "secret": shown["secret"],
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


async def _find(ch: CH, tenant: str, webhook_id: str | None = None) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(_COLUMNS)} FROM webhooks FINAL WHERE tenant = {{tenant:String}} AND deleted = 0"
    params: dict[str, Any] = {"tenant": tenant}
    if webhook_id is not None:
        sql += " AND id = {id:String}"
        params["id"] = webhook_id
    result = await ch.query(sql + " ORDER BY created_at DESC, id", parameters=params)
    return list(result.named_results())


async def _one(ch: CH, tenant: str, webhook_id: str) -> dict[str, Any]:
    found = await _find(ch, tenant, webhook_id)
    if not found:
        raise NotFound(f"webhook {webhook_id!r}")
    return found[0]


async def _checked_channel(body: WebhookIn, settings: SettingsDep) -> NewChannel:
    """The new channel of a valid request; raises InvalidField naming the field."""
    notify = settings.notify
    try:
        return await validate_channel(
            body.format, ChannelRequest(body.url, body.email, body.secret),
            allow_private=notify.webhook.allow_private, timeout_s=notify.timeout_s,
        )  # fmt: skip
    except ChannelRefused as exc:
        raise InvalidField(exc.field, exc.message) from None


@router.post("", status_code=201, summary="Create an alert channel (admin)")
async def create_webhook(body: WebhookIn, principal: Admin, ch: CH, settings: SettingsDep) -> dict:
    new = await _checked_channel(body, settings)
    webhook_id = "wh_" + secrets.token_hex(8)
    now = datetime.now(UTC)
    row = [principal.tenant, webhook_id, new.format, new.url, new.email, new.secret, now, now, 0,
           int(now.timestamp() * 1e6)]  # fmt: skip
    await ch.insert("webhooks", [row], column_names=_WRITE_COLUMNS)
    out = _view(dict(zip(_WRITE_COLUMNS, row)))
    if new.secret_generated:
        out["secret"] = new.secret  # shown once: the receiver needs it to verify signatures
    return out


@router.get("", summary="Your alert channels (secrets masked)")
async def list_webhooks(principal: Reader, ch: CH) -> dict:
    return {"webhooks": [_view(r) for r in await _find(ch, principal.tenant)]}


@router.get("/{webhook_id}", summary="One alert channel (secret masked)")
async def get_webhook(webhook_id: str, principal: Reader, ch: CH) -> dict:
    return _view(await _one(ch, principal.tenant, webhook_id))


@router.delete("/{webhook_id}", status_code=204, summary="Delete an alert channel (admin)")
async def delete_webhook(webhook_id: str, principal: Admin, ch: CH) -> Response:
    row = await _one(ch, principal.tenant, webhook_id)
    now = datetime.now(UTC)
    values = {**row, "tenant": principal.tenant, "updated_at": now, "deleted": 1, "version": int(now.timestamp() * 1e6)}
    await ch.insert("webhooks", [[values[c] for c in _WRITE_COLUMNS]], column_names=_WRITE_COLUMNS)
    return Response(status_code=204)


@router.post("/{webhook_id}/test", summary="Send a signed test alert now and return the result (admin)")
async def test_webhook(webhook_id: str, principal: Admin, ch: CH, settings: SettingsDep) -> dict:
    row = await _one(ch, principal.tenant, webhook_id)
    alert, result = await deliver_test_alert(settings, ch, principal.tenant, _channel(row))
    return {
        "alert_id": alert.alert_id,
        "delivered": result.delivered,
        "result": result.verdict,
        "http_status": result.http_status,
        "error": result.error,
        "duration_ms": result.duration_ms,
    }
