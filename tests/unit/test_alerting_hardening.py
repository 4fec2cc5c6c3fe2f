"""spendstream.alerting against hostile values: Retry-After bounds, one-address e-mail channels, control
characters in anything that reaches a header or a one-line summary."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import default as default_policy
from email.utils import format_datetime
from pathlib import Path

import orjson
import pytest

from spendstream.alerting.channels import CHANNEL_TYPES
from spendstream.alerting.channels.base import Channel
from spendstream.alerting.channels.email import email_message
from spendstream.alerting.channels.pagerduty import pagerduty_body
from spendstream.alerting.channels.slack import slack_body
from spendstream.alerting.payloads import Alert, BadAlert, created_at, parse_alert, summary
from spendstream.alerting.retries import (
    GAVE_UP,
    RETRY_AFTER_MAX_S,
    RETRY_AFTER_MIN_S,
    RetryPolicy,
    attempt_outcome,
    parse_retry_after,
)
from spendstream.alerting.targets import EMAIL_MAX_LEN, UnsafeTarget, channel_refusal, email_refusal, parse_webhook_url

RAW = (Path(__file__).parent.parent / "fixtures" / "budget_alert_v1.json").read_bytes()
NOW = datetime(2024, 3, 31, 9, 0, tzinfo=UTC)
INJECTED_NAME = "Evil\r\nBcc: attacker@evil.example\r\n\r\nforged body"


def build_request(channel: Channel, a: Alert, now: float):
    return CHANNEL_TYPES[channel.format].build_request(channel, a, now)


def alert(**changes) -> Alert:
    data = json.loads(RAW)
    data.update(changes)
    return parse_alert(orjson.dumps(data))


# ------------------------------------------------------------------------------ Retry-After


def test_retry_after_bounds_are_one_second_and_five_minutes():
    assert (RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S) == (1.0, 300.0)


@pytest.mark.parametrize(
    "value, seconds",
    [("7", 7.0), (" 42 ", 42.0), ("300", 300.0), ("0", 1.0), ("1", 1.0), ("000", 1.0), ("301", 300.0),
     ("31536000", 300.0), ("9" * 60, 300.0)],
)  # fmt: skip
def test_retry_after_seconds_are_floored_and_capped(value, seconds):
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize(
    "offset, seconds",
    [(timedelta(seconds=30), 30.0), (timedelta(0), 1.0), (timedelta(seconds=-30), 1.0), (timedelta(days=-9000), 1.0),
     (timedelta(hours=2), 300.0), (timedelta(days=3000), 300.0)],
)  # fmt: skip
def test_retry_after_http_dates_are_floored_and_capped(offset, seconds):
    assert parse_retry_after(format_datetime(NOW + offset, usegmt=True), NOW) == seconds


def test_retry_after_obsolete_date_forms_are_read_too():
    # RFC 850 and asctime forms (RFC 9110 says a recipient must accept them); asctime has no zone: UTC
    assert parse_retry_after("Sunday, 31-Mar-24 09:00:20 GMT", NOW) == 20.0
    assert parse_retry_after("Sun Mar 31 09:00:45 2024", NOW) == 45.0


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "-5", "-0", "+5", "1.5", "1e3", "5s", "²", "٣", "0x10", "soon", "NaN", "inf",
     "Sun, 06 Nov 99999 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 +2500", "Sun, 06 Nov 1994 25:61:61 GMT",
     "1" * 65, "x" * 100_000, "7\r\n8"],
)  # fmt: skip
def test_retry_after_garbage_is_ignored(value):
    assert parse_retry_after(value, NOW) is None


def test_a_capped_retry_after_still_gives_up_at_the_horizon():
    policy = RetryPolicy(horizon_s=120)
    capped = parse_retry_after("86400", NOW)
    assert capped == RETRY_AFTER_MAX_S
    assert attempt_outcome("retry", 1, 0, capped, policy, lambda: 1.0) == (GAVE_UP, None)
    assert attempt_outcome("retry", 1, 0, parse_retry_after("0", NOW), policy, lambda: 1.0) == ("failed", 1.0)


# ------------------------------------------------------------------------------ e-mail channels


@pytest.mark.parametrize(
    "address, reason",
    [("a@example.com, b@example.com", "one @"),
     ("a@example.com,b@example.com", "one @"),
     ("a@example.com;b@example.com", "one @"),
     ("a,b@example.com", "no lists"),
     ("Name <a@example.com>", "display names"),
     ("<a@example.com>", "display names"),
     ('"a b"@example.com', "quoting"),
     ('"a@b"@example.com', "one @"),
     ("a(comment)@example.com", "comments"),
     ("a@example.com (comment)", "comments"),
     ("a@example.com\r\nBcc: b@example.com", "control character"),
     ("a@example.com\n", "control character"),
     ("a@example.com\r", "control character"),
     ("a\x00@example.com", "control character"),
     ("a@exa\tmple.com", "control character"),
     ("a@example.com\x85", "control character"),
     ("a@example.com\u2028Bcc: b@example.com", "control character"),
     (" a@example.com", "no lists"),
     ("a@[127.0.0.1]", "name@example.com"),
     ("a@localhost", "name@example.com"),
     ("a..b@example.com", "name@example.com"),
     (".a@example.com", "name@example.com"),
     ("a@-example.com", "name@example.com"),
     ("a@example..com", "name@example.com"),
     ("ä@example.com", "name@example.com"),
     ("x" * 65 + "@example.com", "longer than 64"),
     ("a@" + "b" * 64 + ".com", "name@example.com"),
     ("a@" + ".".join(["b" * 60] * 5) + ".com", f"longer than {EMAIL_MAX_LEN}"),
     ("", "empty"),
     ("no-at-sign", "one @")],
)  # fmt: skip
def test_email_channels_hold_exactly_one_plain_address(address, reason):
    refusal = email_refusal(address)
    assert refusal is not None and reason in refusal, refusal


@pytest.mark.parametrize(
    "address",
    ["oncall@example.com", "a.b+tag@sub.example.co.uk", "o'brien@example.ie", "x" * 64 + "@example.com",
     "ops-team_1@xn--bcher-kva.example"],
)  # fmt: skip
def test_plain_addresses_pass(address):
    assert email_refusal(address) is None


def test_budget_channel_entries():
    assert channel_refusal("wh_0011223344556677") is None and channel_refusal("oncall@example.com") is None
    assert "control character" in channel_refusal("wh_1\r\nX-Evil: 1")
    assert "control character" in channel_refusal("wh_1\x00")
    assert "one @" in channel_refusal("a@example.com, b@example.com")
    assert "display names" in channel_refusal("Boss <boss@example.com>")


# ------------------------------------------------------------------------------ what is sent


def test_a_budget_name_with_line_breaks_gives_a_one_line_subject_and_no_extra_header():
    a = alert(budget_name=INJECTED_NAME)
    msg = email_message(a, "oncall@example.com", "spendstream@example.com", NOW)
    wire = msg.as_bytes()
    back = message_from_bytes(wire, policy=default_policy)
    assert back["Bcc"] is None and "Bcc" not in back.keys()
    assert back.get_all("To") == ["oncall@example.com"]
    assert sorted(back.keys()) == sorted(["Subject", "From", "To", "Date", "Message-ID", "X-Spendstream-Alert-Id",
                                          "Content-Type", "Content-Transfer-Encoding", "MIME-Version"])  # fmt: skip
    assert back["Subject"] == (
        "[Spendstream] Budget 'Evil  Bcc: attacker@evil.example    forged body' crossed 80% of its daily limit: "
        "8.012345678 of 10.00 USD (80.12%)"
    )
    assert back.get_content().startswith("Budget 'Evil  Bcc: attacker@evil.example    forged body' crossed 80%")


@pytest.mark.parametrize("char", ["\r", "\n", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\x7f"])
def test_every_line_breaking_or_control_character_is_neutralised(char):
    a = alert(budget_name=f"a{char}b", scope={"project": f"p{char}Spent: 0 USD"},
              top=[{"kind": "agent", "name": f"x{char}y", "spent_usd": "1"}])  # fmt: skip
    assert summary(a).startswith("Budget 'a b' crossed")
    msg = email_message(a, "oncall@example.com", "spendstream@example.com", NOW)
    body_lines = msg.get_content().splitlines()
    # the forged "Spent:" stays inside the Scope line
    spent = [line for line in body_lines if line.startswith("Spent:")]
    assert spent == ["Spent: 8.012345678 USD of 10.00 USD (80.12%)"]
    assert "Scope: project=p Spent: 0 USD" in body_lines and "Top spenders: agent x y 1.00 USD" in body_lines
    slack = slack_body(a)
    assert "\n" not in slack["text"] and char not in slack["text"]
    assert char not in pagerduty_body(a, "KEY")["payload"]["summary"]
    # the generic JSON body keeps the name as stored (JSON escapes it; the receiver sees the truth)
    generic = orjson.loads(build_request(Channel("wh", "generic", url="https://x.io/"), a, 0).body)
    assert generic["budget_name"] == f"a{char}b"


@pytest.mark.parametrize(
    "to",
    ["a@example.com, b@example.com", "a@example.com\r\nBcc: c@example.com", "a@example.com\n", "A <a@example.com>"],
)
def test_an_email_is_never_built_for_anything_but_one_address(to):
    with pytest.raises(ValueError, match="recipient refused"):
        email_message(alert(), to, "spendstream@example.com", NOW)


@pytest.mark.parametrize("alert_id", ["al_1\r\nX-Evil: 1", "al 1", "al_<1>", "", "a" * 129, 42, "al_ä"])
def test_alert_ids_that_cannot_be_a_header_value_are_not_alerts(alert_id):
    with pytest.raises(BadAlert, match="alert_id"):
        alert(alert_id=alert_id)


def test_a_request_header_with_a_control_character_is_refused_not_sent():
    a = Alert("al_1\r\nX-Evil: 1", "acme", "threshold", ("wh",), json.loads(RAW))
    with pytest.raises(ValueError, match="control character in header Idempotency-Key"):
        build_request(Channel("wh", "generic", url="https://x.io/"), a, 0)


@pytest.mark.parametrize("url", ["https://x.io/\x00", "https://x.io/a\x0bb", "https://x.io/\x7f", "https://x.io/\u2028",
                                 "https://x.io/a b", "https://x.io/\r\nHost: evil"])  # fmt: skip
def test_webhook_urls_with_control_characters_are_refused(url):
    with pytest.raises(UnsafeTarget, match="whitespace or control"):
        parse_webhook_url(url)


def test_a_created_at_without_zone_is_read_as_utc():
    # subtracted from an aware "now" when a delivery is timed: a naive stamp used to raise there
    assert created_at(alert(created_at="2024-03-31T09:15:02")) == datetime(2024, 3, 31, 9, 15, 2, tzinfo=UTC)
