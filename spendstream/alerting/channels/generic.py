"""Generic webhook: the alert's contract fields as JSON, HMAC-SHA256 signed when the channel has a
secret (one is generated at creation unless given), ``Idempotency-Key: <alert_id>``.

A receiver verifies ``X-Spendstream-Signature: t=<unix s>,v1=<hex>`` with :func:`verify_signature`:
the HMAC of ``f"{t}.{body}"``, refused when ``t`` is older than ``SIGNATURE_TOLERANCE_S``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import orjson

from spendstream.alerting.channels.base import Channel, NewChannel, WebhookChannelType
from spendstream.alerting.payloads import Alert, generic_body

SIGNATURE_HEADER = "X-Spendstream-Signature"
TIMESTAMP_HEADER = "X-Spendstream-Timestamp"
#: a receiver should refuse signatures older than this (replay protection); see verify_signature
SIGNATURE_TOLERANCE_S = 300


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` with the webhook's secret."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str, header: str, body: bytes, now: float, tolerance_s: float = SIGNATURE_TOLERANCE_S
) -> bool:
    """What a receiver runs: ``header`` is the X-Spendstream-Signature value ``t=<unix s>,v1=<hex>``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), parts.get("v1", ""))


class GenericWebhook(WebhookChannelType):
    name = "generic"

    def with_secret(self, new: NewChannel) -> NewChannel:
        if new.secret:
            return new
        return NewChannel(new.format, url=new.url, secret="whsec_" + secrets.token_urlsafe(32), secret_generated=True)

    def payload(self, channel: Channel, alert: Alert, now: float) -> tuple[bytes, dict[str, str]]:
        body = orjson.dumps(generic_body(alert))
        timestamp = int(now)
        headers = {TIMESTAMP_HEADER: str(timestamp)}
        if channel.secret:
            headers[SIGNATURE_HEADER] = f"t={timestamp},v1={sign(channel.secret, timestamp, body)}"
        return body, headers


CHANNEL = GenericWebhook()
