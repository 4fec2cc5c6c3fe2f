"""PagerDuty Events API v2: a trigger event whose ``dedup_key`` is the alert_id; the channel's
secret is the integration's routing key (required), the URL defaults to the Events API."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from spendstream.alerting.channels.base import Channel, WebhookChannelType
from spendstream.alerting.payloads import Alert, generic_body, summary

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


def pagerduty_severity(alert: Alert) -> str:
    """forecast -> warning; threshold >= 100 % -> critical, >= 80 % -> error, >= 50 % -> warning, else info."""
    if alert.kind == "forecast":
        return "warning"
    try:
        threshold = Decimal(str(alert.fields.get("threshold")))
    except InvalidOperation:
        return "error"
    if threshold >= 100:
        return "critical"
    if threshold >= 80:
        return "error"
    if threshold >= 50:
        return "warning"
    return "info"


def pagerduty_body(alert: Alert, routing_key: str) -> dict[str, Any]:
    f = alert.fields
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": alert.alert_id,
        "payload": {
            "summary": summary(alert)[:1024],  # PagerDuty's limit
            "source": "spendstream",
            "severity": pagerduty_severity(alert),
            "timestamp": f.get("created_at"),
            "component": f.get("budget_name") or f.get("budget_id"),
            "group": alert.tenant,
            "class": f"budget_{alert.kind}",
            "custom_details": generic_body(alert),
        },
    }


class PagerDutyEvents(WebhookChannelType):
    name = "pagerduty"
    default_url = PAGERDUTY_EVENTS_URL
    secret_required = "the PagerDuty integration's routing key is required"

    def payload(self, channel: Channel, alert: Alert, now: float) -> tuple[bytes, dict[str, str]]:
        return orjson.dumps(pagerduty_body(alert, channel.secret)), {}


CHANNEL = PagerDutyEvents()
