"""Slack incoming webhook: a one-line text and blocks with the details. The URL itself is the
credential (its path is the token), so only its end is ever shown. Slack has no idempotency key."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson

from spendstream.alerting.channels.base import Channel, WebhookChannelType, mask_secret, masked
from spendstream.alerting.payloads import Alert, detail_lines, summary


def slack_body(alert: Alert) -> dict[str, Any]:
    text = summary(alert)
    details = "\n".join(detail_lines(alert))
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_slack_escape(text)}*"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(details)}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"Spendstream alert `{alert.alert_id}`"}]},
        ],
    }


def _slack_escape(text: str) -> str:
    # Slack treats <...> as links/mentions; budget names are user input
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackWebhook(WebhookChannelType):
    name = "slack"

    def masked(self, channel: Channel) -> dict[str, str]:
        shown = masked(channel)
        if channel.url:
            parts = urlsplit(channel.url)
            shown["url"] = f"{parts.scheme}://{parts.netloc}/{mask_secret(parts.path)}"
        return shown

    def payload(self, channel: Channel, alert: Alert, now: float) -> tuple[bytes, dict[str, str]]:
        return orjson.dumps(slack_body(alert)), {}


CHANNEL = SlackWebhook()
