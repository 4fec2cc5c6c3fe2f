"""An anomaly alert through the alerting domain: the notify stage accepts it, every channel type
builds its message with the explanation, and the text is one line where it must be."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from spendstream.alerting import CHANNEL_TYPES, Channel, ChannelRequest, MailChannelType, parse_alert, summary
from spendstream.alerting.payloads import detail_lines, generic_body
from spendstream.anomaly import Detector, Rule, anomaly_alert_value
from spendstream.anomaly.baseline import MINUTE_MS, Baseline
from spendstream.budgets.store import alert_row

NOW = datetime(2026, 3, 31, 9, 15, 3, tzinfo=UTC)
T0 = 1_780_000_000_000 - 1_780_000_000_000 % 3_600_000
BASE = Baseline(10_000_000, 0, 10_000_000.0, 10.0, 10_000.0, {"openai/gpt-4o": 10_000_000.0}, 420, "hour_of_day")


def an_alert_value(agent: str = "crawler") -> dict:
    d = Detector()
    for m in range(10):
        n = 250 if m >= 8 else 10
        for c in range(n):
            d.add("t1", "search", agent, "openai/gpt-4o", T0 + m * MINUTE_MS + c, 1_000_000, 1000, f"ev-{m}-{c}")
    (found,) = d.close(T0 + 9 * MINUTE_MS, lambda *a: BASE, lambda t: Rule(min_excess_nanos=100_000_000))
    return anomaly_alert_value(found, ("wh_1",), T0 + 10 * MINUTE_MS)


def test_the_notify_stage_reads_an_anomaly_alert() -> None:
    value = an_alert_value()
    alert = parse_alert(orjson.dumps(value))
    assert alert.kind == "anomaly" and alert.channels == ("wh_1",)
    body = generic_body(alert)
    assert body["anomaly"]["spike_type"] == "volume" and body["anomaly"]["ratio"] == 25.0
    text = summary(alert)
    assert "search, agent=crawler" in text or "agent=crawler" in text
    assert "25.0x the usual" in text and "volume spike" in text
    lines = detail_lines(alert)
    assert any(line.startswith("Why: volume spike: 250 calls, 25.0x") for line in lines)
    assert any("openai/gpt-4o" in line and "100%" in line for line in lines)


def test_hostile_names_stay_on_one_line() -> None:
    alert = parse_alert(an_alert_value(agent="evil\r\nSubject: forged"))
    assert "\n" not in summary(alert) and all("\n" not in line for line in detail_lines(alert))


@pytest.mark.parametrize("kind", list(CHANNEL_TYPES.values()), ids=list(CHANNEL_TYPES))
def test_every_channel_type_builds_an_anomaly_alert(kind) -> None:
    alert = parse_alert(an_alert_value())
    if isinstance(kind, MailChannelType):
        new = kind.validate(ChannelRequest(email="oncall@example.com"))
        channel = Channel("wh_1", new.format, email=new.email)
        message = kind.build_message(channel, alert, "spendstream@example.com", NOW)
        assert "Spend anomaly" in message["Subject"]
    else:
        new = kind.validate(ChannelRequest(url="https://93.184.216.34/hook", secret="s3cret-routing-key-0123"))
        channel = Channel("wh_1", new.format, url=new.url, secret=new.secret)
        request = kind.build_request(channel, alert, NOW.timestamp())
        assert b"anomaly" in request.body.lower() if isinstance(request.body, bytes) else "anomaly" in str(request)


def test_the_history_row_keeps_the_explanation() -> None:
    value = an_alert_value()
    row = alert_row(value)
    assert row[2] == "anomaly" and row[3] == "anomaly"
    assert orjson.loads(row[-1])["spike_type"] == "volume"
