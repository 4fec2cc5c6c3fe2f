"""spendstream.alerting: alert parsing, the four channel formats, signatures, retry schedule, SSRF rules."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import orjson
import pytest

from spendstream.alerting.channels import CHANNEL_TYPES
from spendstream.alerting.channels.base import IDEMPOTENCY_HEADER, Channel
from spendstream.alerting.channels.email import email_message
from spendstream.alerting.channels.generic import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from spendstream.alerting.channels.pagerduty import pagerduty_severity
from spendstream.alerting.payloads import GENERIC_FIELDS, BadAlert, created_at, human_usd, parse_alert, sample_alert
from spendstream.alerting.retries import (
    DELIVERED,
    FAILED,
    GAVE_UP,
    REFUSED,
    RetryPolicy,
    attempt_outcome,
    classify_http,
    parse_retry_after,
)
from spendstream.alerting.targets import (
    UnsafeTarget,
    address_refusal,
    email_refusal,
    is_email_channel,
    parse_webhook_url,
)

FIXTURE = Path(__file__).parent.parent / "fixtures" / "budget_alert_v1.json"
RAW = FIXTURE.read_bytes()
NOW = 1_711_876_502.0  # 2024-03-31T09:15:02Z


def build_request(channel: Channel, a, now: float):
    return CHANNEL_TYPES[channel.format].build_request(channel, a, now)


def alert(**changes):
    data = json.loads(RAW)
    data.update(changes)
    return parse_alert(orjson.dumps(data))


# ------------------------------------------------------------------------------- parsing


def test_parse_alert_reads_contract_v1():
    a = parse_alert(RAW)
    assert (a.alert_id, a.tenant, a.kind) == ("al_3c1f0a9e6b2d4f8a9c7e5b1d2f3a4b5c", "acme", "threshold")
    assert a.channels == ("wh_0011223344556677", "oncall@example.com")


def test_parse_alert_collapses_repeated_channels():
    assert alert(channels=["wh_1", "a@b.io", "wh_1"]).channels == ("wh_1", "a@b.io")


@pytest.mark.parametrize(
    "value, message",
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (orjson.dumps({**json.loads(RAW), "alert_id": ""}), "missing alert_id"),
        (
            orjson.dumps({k: v for k, v in json.loads(RAW).items() if k not in ("tenant", "channels")}),
            "missing tenant, channels",
        ),
        (orjson.dumps({**json.loads(RAW), "channels": "wh_1"}), "channels must be a list"),
        (orjson.dumps({**json.loads(RAW), "channels": ["wh_1", ""]}), "channels must be a list"),
        (orjson.dumps({**json.loads(RAW), "kind": "weird"}), "unknown kind"),
    ],
)
def test_parse_alert_refuses_what_is_not_an_alert(value, message):
    with pytest.raises(BadAlert, match=message):
        parse_alert(value)


# ------------------------------------------------------------------------------ generic


def test_generic_request_is_signed_over_timestamp_dot_body():
    channel = Channel("wh_1", "generic", url="https://hooks.example.com/x", secret="s3cr3t-value")
    request = build_request(channel, parse_alert(RAW), NOW)
    timestamp = request.headers[TIMESTAMP_HEADER]
    assert timestamp == str(int(NOW))
    expected = hmac.new(b"s3cr3t-value", f"{timestamp}.".encode() + request.body, hashlib.sha256).hexdigest()
    assert request.headers[SIGNATURE_HEADER] == f"t={timestamp},v1={expected}"
    assert verify_signature("s3cr3t-value", request.headers[SIGNATURE_HEADER], request.body, NOW + 10)
    assert request.headers[IDEMPOTENCY_HEADER] == "al_3c1f0a9e6b2d4f8a9c7e5b1d2f3a4b5c"
    assert request.headers["Content-Type"] == "application/json"


def test_signature_fails_with_wrong_secret_tampered_body_or_old_timestamp():
    channel = Channel("wh_1", "generic", url="https://hooks.example.com/x", secret="s3cr3t-value")
    request = build_request(channel, parse_alert(RAW), NOW)
    header = request.headers[SIGNATURE_HEADER]
    assert not verify_signature("other-secret", header, request.body, NOW)
    assert not verify_signature("s3cr3t-value", header, request.body.replace(b"80.12", b"10.12"), NOW)
    assert not verify_signature("s3cr3t-value", header, request.body, NOW + 301)
    assert not verify_signature("s3cr3t-value", "v1=abc", request.body, NOW)


def test_generic_body_has_the_issue_fields_money_as_decimal_strings_and_no_channels():
    body = orjson.loads(build_request(Channel("wh_1", "generic", url="https://x.io/"), parse_alert(RAW), NOW).body)
    assert list(body) == list(GENERIC_FIELDS)
    for name in ("alert_id", "kind", "budget_id", "budget_name", "scope", "window_start", "window_end", "threshold",
                 "spent_usd", "limit_usd", "percent_used", "projected_usd", "top", "event_id"):  # fmt: skip
        assert name in body
    assert body["spent_usd"] == "8.012345678" and body["limit_usd"] == "10.000000000"
    assert body["scope"] == {"project": "research", "agent": "crawler"}
    assert "channels" not in body and not any(k.endswith("_nanos") for k in body)


def test_generic_without_secret_is_sent_unsigned():
    request = build_request(Channel("wh_1", "generic", url="https://x.io/"), parse_alert(RAW), NOW)
    assert SIGNATURE_HEADER not in request.headers
    assert request.headers[IDEMPOTENCY_HEADER] == parse_alert(RAW).alert_id


# ------------------------------------------------------------------- slack, pagerduty, email


def test_slack_body_has_text_and_blocks_with_escaped_names():
    body = orjson.loads(
        build_request(
            Channel("wh_2", "slack", url="https://hooks.slack.com/services/T/B/X"), parse_alert(RAW), NOW
        ).body
    )
    assert (
        body["text"]
        == "Budget 'Research agents <daily>' crossed 80% of its daily limit: 8.012345678 of 10.00 USD (80.12%)"
    )
    assert [b["type"] for b in body["blocks"]] == ["section", "section", "context"]
    first = body["blocks"][0]["text"]
    assert first["type"] == "mrkdwn" and "&lt;daily&gt;" in first["text"] and "<daily>" not in first["text"]
    details = body["blocks"][1]["text"]["text"]
    assert "project=research" in details and "agent crawler 8.012345678 USD" in details


def test_pagerduty_event_uses_routing_key_and_alert_id_as_dedup_key():
    a = parse_alert(RAW)
    body = orjson.loads(
        build_request(
            Channel("wh_3", "pagerduty", url="https://events.pagerduty.com/v2/enqueue", secret="R0UTINGKEY"), a, NOW
        ).body
    )
    assert body["routing_key"] == "R0UTINGKEY"
    assert body["event_action"] == "trigger"
    assert body["dedup_key"] == a.alert_id
    payload = body["payload"]
    assert payload["severity"] == "error" and payload["source"] == "spendstream"
    assert payload["summary"].startswith("Budget 'Research agents <daily>' crossed 80%")
    assert payload["custom_details"]["spent_usd"] == "8.012345678"
    assert payload["timestamp"] == "2024-03-31T09:15:02.456Z"


@pytest.mark.parametrize(
    "kind, threshold, severity",
    [("threshold", "100", "critical"), ("threshold", "150", "critical"), ("threshold", "80", "error"),
     ("threshold", "99.5", "error"), ("threshold", "50", "warning"), ("threshold", "25", "info"),
     ("forecast", None, "warning")],
)  # fmt: skip
def test_pagerduty_severity_follows_the_threshold(kind, threshold, severity):
    assert pagerduty_severity(alert(kind=kind, threshold=threshold)) == severity


def test_forecast_summary_names_the_projection():
    a = alert(kind="forecast", threshold=None, projected_usd="12.400000000", projected_at="2024-03-31T18:00:00.000Z")
    body = orjson.loads(build_request(Channel("wh_2", "slack", url="https://x.io/"), a, NOW).body)
    assert (
        body["text"]
        == "Budget 'Research agents <daily>' is projected to reach 12.40 USD in its daily window, over its 10.00 USD limit"
    )
    assert "limit reached around 2024-03-31T18:00:00.000Z" in body["blocks"][1]["text"]["text"]


def test_email_message_carries_the_alert_and_a_stable_message_id():
    a = parse_alert(RAW)
    when = datetime(2024, 3, 31, 9, 15, 3, tzinfo=UTC)
    msg = email_message(a, "oncall@example.com", "spendstream@example.com", when)
    again = email_message(a, "oncall@example.com", "spendstream@example.com", when + timedelta(minutes=5))
    other = email_message(a, "cfo@example.com", "spendstream@example.com", when)
    assert msg["To"] == "oncall@example.com" and msg["From"] == "spendstream@example.com"
    assert msg["Subject"].startswith("[Spendstream] Budget 'Research agents <daily>' crossed 80%")
    assert msg["X-Spendstream-Alert-Id"] == a.alert_id
    assert msg["Message-ID"] == again["Message-ID"] != other["Message-ID"]
    text = msg.get_content()
    assert "Spent: 8.012345678 USD of 10.00 USD (80.12%)" in text
    assert "Window: 2024-03-30T23:00:00.000Z .. 2024-03-31T22:00:00.000Z (Europe/Berlin)" in text


def test_sample_alert_is_a_marked_threshold_alert():
    a = sample_alert("acme", datetime(2024, 1, 1, tzinfo=UTC))
    body = orjson.loads(build_request(Channel("wh_1", "generic", url="https://x.io/", secret="k" * 16), a, NOW).body)
    assert body["test"] is True and body["kind"] == "threshold" and body["tenant"] == "acme"
    assert a.alert_id.startswith("test_") and a.alert_id != sample_alert("acme", datetime.now(UTC)).alert_id


@pytest.mark.parametrize(
    "amount, text",
    [("8.010000000", "8.01"), ("10.000000000", "10.00"), ("0.000123400", "0.0001234"), ("7", "7.00"),
     ("12.5", "12.50"), (None, "?")],
)  # fmt: skip
def test_human_usd_is_exact(amount, text):
    assert human_usd(amount) == text


# -------------------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "status, verdict",
    [(200, "delivered"), (202, "delivered"), (204, "delivered"), (301, "final"), (400, "final"), (401, "final"),
     (404, "final"), (408, "retry"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry")],
)  # fmt: skip
def test_classify_http(status, verdict):
    assert classify_http(status) == verdict


def test_retry_after_seconds_and_http_date():
    now = datetime(2024, 3, 31, 9, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 1.0  # the floor
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_backoff_is_exponential_with_full_jitter_and_a_cap():
    policy = RetryPolicy(horizon_s=10_000, base_s=0.5, cap_s=8)
    assert [policy.next_delay(n, 0, None, lambda: 1.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 8, 8]
    assert policy.next_delay(3, 0, None, lambda: 0.0) == 0.0
    assert policy.next_delay(3, 0, None, lambda: 0.25) == 0.5
    assert policy.next_delay(10_000, 0, None, lambda: 1.0) == 8  # no overflow


def test_backoff_honours_retry_after_and_stops_at_the_horizon():
    policy = RetryPolicy(horizon_s=60, base_s=0.5, cap_s=8)
    assert policy.next_delay(1, 0, 42.0, lambda: 1.0) == 42.0
    assert policy.next_delay(1, 30, 42.0, lambda: 1.0) is None
    assert policy.next_delay(2, 59, None, lambda: 1.0) == 1.0  # a retry at exactly the horizon is allowed
    assert policy.next_delay(2, 59.5, None, lambda: 1.0) is None


def test_attempt_outcomes():
    policy = RetryPolicy(horizon_s=60)
    half = lambda: 0.5  # noqa: E731
    assert attempt_outcome("delivered", 1, 0, None, policy, half) == (DELIVERED, None)
    assert attempt_outcome("refused", 1, 0, None, policy, half) == (REFUSED, None)
    assert attempt_outcome("final", 1, 0, None, policy, half) == (GAVE_UP, None)
    assert attempt_outcome("retry", 2, 0, None, policy, half) == (FAILED, 0.5)
    assert attempt_outcome("retry", 2, 60, None, policy, half) == (GAVE_UP, None)


# ----------------------------------------------------------------------------------- SSRF


@pytest.mark.parametrize(
    "url, host, port",
    [("https://hooks.example.com/a?b=1", "hooks.example.com", 443), ("http://Example.COM:8080", "example.com", 8080),
     ("https://[2606:4700::1111]/x", "2606:4700::1111", 443)],
)  # fmt: skip
def test_parse_webhook_url(url, host, port):
    target = parse_webhook_url(url)
    assert (target.host, target.port) == (host, port)


@pytest.mark.parametrize(
    "url, reason",
    [("ftp://example.com/x", "only http and https"), ("file:///etc/passwd", "only http and https"),
     ("gopher://127.0.0.1:25/", "only http and https"), ("example.com/hook", "only http and https"),
     ("https:///nohost", "no host"), ("https://user:pw@example.com/", "credentials"),
     ("https://example.com:99999/", "not a valid URL"), ("https://exa mple.com/", "whitespace"),
     ("https://example.com/\r\nX-Injected: 1", "whitespace"), ("https://example.com/" + "a" * 2100, "longer than")],
)  # fmt: skip
def test_parse_webhook_url_refusals(url, reason):
    with pytest.raises(UnsafeTarget, match=reason):
        parse_webhook_url(url)


REFUSED_ALWAYS = [
    "0.0.0.0", "::", "169.254.169.254", "fe80::1", "224.0.0.1", "ff02::1", "240.0.0.1", "255.255.255.255",
    "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe",
]  # fmt: skip
REFUSED_UNLESS_ALLOWED = [
    "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "fc00::1",
    "fd12:3456::1", "fec0::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1",
    "2002:0a00:0001::1", "192.0.2.1",
]  # fmt: skip
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:0808:0808::1"]


@pytest.mark.parametrize("address", REFUSED_ALWAYS)
def test_addresses_never_allowed(address):
    assert address_refusal(address, allow_private=False)
    assert "never allowed" in address_refusal(address, allow_private=True)


@pytest.mark.parametrize("address", REFUSED_UNLESS_ALLOWED)
def test_loopback_and_private_addresses_only_when_allowed(address):
    assert address_refusal(address, allow_private=False)
    assert address_refusal(address, allow_private=True) is None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


def test_refusal_names_the_kind():
    assert address_refusal("127.0.0.1") == "127.0.0.1 is a loopback address"
    assert address_refusal("::ffff:127.0.0.1") == "::ffff:127.0.0.1 is a loopback address"
    assert address_refusal("169.254.169.254") == "169.254.169.254 is a link-local address (never allowed)"
    assert address_refusal("fe80::1%eth0", allow_private=True) == "fe80::1%eth0 is a link-local address (never allowed)"
    assert address_refusal("not-an-ip") == "'not-an-ip' is not an IP address"


@pytest.mark.parametrize(
    "address, ok",
    [("oncall@example.com", True), ("a.b+tag@sub.example.co.uk", True), ("no-at-sign", False), ("a@b", False),
     ("a@b.com\r\nBcc: x@y.z", False), ("Name <a@b.com>", False), ("a@-b.com", False), ("x" * 65 + "@b.com", False)],
)  # fmt: skip
def test_valid_email(address, ok):
    assert (email_refusal(address) is None) is ok


def test_channels_are_told_apart_by_at_sign():
    assert is_email_channel("oncall@example.com") and not is_email_channel("wh_0011223344556677")


def test_created_at_is_read_when_present():
    assert created_at(parse_alert(RAW)) == datetime(2024, 3, 31, 9, 15, 2, 456000, tzinfo=UTC)
    assert created_at(alert(created_at=None)) is None and created_at(alert(created_at="soon")) is None
