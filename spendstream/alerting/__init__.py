"""Alerting: budget alerts delivered to their channels (webhooks: generic, Slack, PagerDuty; e-mail).

The domain core that the notify stage (delivery with retries) and the query API (channels,
test alerts, alert history) both use. Pure modules plus thin IO:

- ``payloads``: a ``spendstream.budget.alerts`` value -> ``Alert``; the text shown of it;
- ``channels``: the registry of channel types (one module each): validation, masking, requests;
- ``targets``: where an alert may go (SSRF rules for URLs and addresses, one-address e-mail);
- ``retries``: what an attempt's answer means, backoff and ``Retry-After`` bounds, outcomes;
- ``sender``: one attempt to one channel over HTTP or SMTP (IO; no metrics);
- ``store``: ``webhooks`` and ``alert_deliveries`` in ClickHouse (IO).

Per alert: ``alert = parse_alert(value)``; per channel: ``store.channel(tenant, id)``, then
``sender.send(channel, alert)`` until ``attempt_outcome`` says it is final, each attempt recorded
with ``store.record``.
"""

from spendstream.alerting.channels import (
    CHANNEL_FORMATS,
    CHANNEL_TYPES,
    EMAIL_FORMAT,
    Channel,
    ChannelRefused,
    ChannelRequest,
    ChannelType,
    HttpRequest,
    MailChannelType,
    NewChannel,
    WebhookChannelType,
    endpoint_of,
    masked_channel,
    validate_channel,
)
from spendstream.alerting.channels.base import IDEMPOTENCY_HEADER
from spendstream.alerting.channels.generic import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from spendstream.alerting.channels.pagerduty import PAGERDUTY_EVENTS_URL
from spendstream.alerting.payloads import Alert, BadAlert, created_at, parse_alert, sample_alert, summary
from spendstream.alerting.retries import (
    DELIVERED,
    FAILED,
    FINAL_OUTCOMES,
    GAVE_UP,
    REFUSED,
    RetryPolicy,
    attempt_outcome,
    classify_http,
    parse_retry_after,
)
from spendstream.alerting.sender import AttemptResult, Sender, deliver_test_alert
from spendstream.alerting.store import (
    CHANNEL_REFRESH_S,
    POISON_ATTEMPT,
    Attempt,
    ChannelHistory,
    DeliveryStore,
    Histories,
    UnstorableAttempt,
)
from spendstream.alerting.targets import (
    UnsafeTarget,
    address_refusal,
    channel_refusal,
    email_refusal,
    is_email_channel,
    resolve_checked,
)

__all__ = [
    "CHANNEL_FORMATS",
    "CHANNEL_REFRESH_S",
    "CHANNEL_TYPES",
    "DELIVERED",
    "EMAIL_FORMAT",
    "FAILED",
    "FINAL_OUTCOMES",
    "GAVE_UP",
    "IDEMPOTENCY_HEADER",
    "PAGERDUTY_EVENTS_URL",
    "POISON_ATTEMPT",
    "REFUSED",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Alert",
    "Attempt",
    "AttemptResult",
    "BadAlert",
    "Channel",
    "ChannelHistory",
    "ChannelRefused",
    "ChannelRequest",
    "ChannelType",
    "DeliveryStore",
    "Histories",
    "HttpRequest",
    "MailChannelType",
    "NewChannel",
    "RetryPolicy",
    "Sender",
    "UnsafeTarget",
    "UnstorableAttempt",
    "WebhookChannelType",
    "address_refusal",
    "attempt_outcome",
    "channel_refusal",
    "classify_http",
    "created_at",
    "deliver_test_alert",
    "email_refusal",
    "endpoint_of",
    "is_email_channel",
    "masked_channel",
    "parse_alert",
    "parse_retry_after",
    "resolve_checked",
    "sample_alert",
    "summary",
    "validate_channel",
    "verify_signature",
]
