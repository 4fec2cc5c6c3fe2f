"""The notify stage's delivery engine against a real HTTP receiver, a real SMTP server and the
embedded ClickHouse (webhooks looked up, every attempt recorded in alert_deliveries)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from notify_support import Mailbox, Receiver, alert_value, deliveries, insert_webhook, wait_until
from query_api_stack import migrate

from spendstream.alerting import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    Attempt,
    Channel,
    DeliveryStore,
    RetryPolicy,
    Sender,
    parse_alert,
    verify_signature,
)
from stream_processors.notify.notifier import PER_ENDPOINT_CONCURRENCY, Notifier
from stream_processors.runtime.retry import is_data_error

pytestmark = pytest.mark.clickhouse

SECRET = "whsec_test_secret_0123456789"
FAST = RetryPolicy(horizon_s=30, base_s=0.05, cap_s=0.2)


@pytest.fixture(scope="module")
def mailbox():
    with Mailbox() as box:
        yield box


@pytest.fixture(scope="module")
def settings(make_settings, mailbox):
    s = make_settings(notify={
        "timeout_s": 2.0, "webhook": {"allow_private": True},
        "smtp": {"host": "127.0.0.1", "port": mailbox.port, "from_address": "spendstream@test.example"},
    })  # fmt: skip
    migrate(s)
    return s


@pytest.fixture
async def receiver():
    async with Receiver() as r:
        yield r


@pytest.fixture
def tenant() -> str:
    return f"t_{uuid.uuid4().hex[:8]}"


def with_notify(settings, *, webhook=None, smtp=None, **fields):
    """``settings`` with some of ``notify``'s fields changed (``webhook``, ``smtp``: dicts of their fields)."""
    n = settings.notify
    notify = n.model_validate({**n.model_dump(), **fields, "webhook": {**n.webhook.model_dump(), **(webhook or {})},
                               "smtp": {**n.smtp.model_dump(), **(smtp or {})}})  # fmt: skip
    return settings.model_copy(update={"notify": notify})


def make_notifier(settings, policy=FAST, **notify):
    s = with_notify(settings, **notify) if notify else settings
    notifier = Notifier(s, DeliveryStore(s, is_data_error=is_data_error), Sender(s), policy=policy)
    notifier.start()
    return notifier


def new_alert(tenant, channels, **changes):
    return parse_alert(alert_value(f"al_{uuid.uuid4().hex}", tenant, channels, **changes))


async def test_generic_webhook_is_signed_and_recorded(settings, receiver, tenant):
    insert_webhook(settings, tenant, "wh_gen", "generic", receiver.script("/gen", [200]), SECRET)
    notifier = make_notifier(settings)
    try:
        alert = new_alert(tenant, ["wh_gen"])
        assert await notifier.submit(alert) == {"wh_gen": "delivered"}
    finally:
        await notifier.close()
    [got] = receiver.at("/gen")
    assert verify_signature(SECRET, got.headers[SIGNATURE_HEADER], got.body, time.time())
    assert not verify_signature("another-secret-value", got.headers[SIGNATURE_HEADER], got.body, time.time())
    assert got.headers[IDEMPOTENCY_HEADER] == alert.alert_id
    body = got.json()
    assert (body["alert_id"], body["spent_usd"], body["limit_usd"], body["threshold"]) == (
        alert.alert_id,
        "8.012345678",
        "10.000000000",
        "80",
    )
    [row] = deliveries(settings, tenant)
    assert (row["channel"], row["format"], row["attempt"], row["outcome"], row["http_status"]) == (
        "wh_gen",
        "generic",
        1,
        "delivered",
        200,
    )


async def test_three_500s_then_200_gives_one_delivery_and_three_recorded_failures(settings, receiver, tenant):
    insert_webhook(settings, tenant, "wh_flaky", "generic", receiver.script("/flaky", [500, 500, 500, 200]), SECRET)
    notifier = make_notifier(settings)
    try:
        alert = new_alert(tenant, ["wh_flaky"])
        assert await notifier.submit(alert) == {"wh_flaky": "delivered"}
    finally:
        await notifier.close()
    assert [r.status for r in receiver.at("/flaky")] == [500, 500, 500, 200]
    assert {r.headers[IDEMPOTENCY_HEADER] for r in receiver.at("/flaky")} == {alert.alert_id}
    rows = deliveries(settings, tenant)
    assert [(r["attempt"], r["outcome"], r["http_status"]) for r in rows] == [
        (1, "failed", 500),
        (2, "failed", 500),
        (3, "failed", 500),
        (4, "delivered", 200),
    ]
    assert rows[0]["error"] == "HTTP 500: nope"


async def test_slack_and_pagerduty_shapes(settings, receiver, tenant):
    insert_webhook(settings, tenant, "wh_slack", "slack", receiver.script("/slack", [200]))
    insert_webhook(settings, tenant, "wh_pd", "pagerduty", receiver.script("/pd", [202]), "PDROUTINGKEY0001")
    notifier = make_notifier(settings)
    try:
        alert = new_alert(tenant, ["wh_slack", "wh_pd"], threshold="100", percent_used="100.01")
        assert await notifier.submit(alert) == {"wh_slack": "delivered", "wh_pd": "delivered"}
    finally:
        await notifier.close()
    slack = receiver.at("/slack")[0].json()
    assert slack["text"].startswith("Budget 'Research agents <daily>' crossed 100% of its daily limit")
    assert [b["type"] for b in slack["blocks"]] == ["section", "section", "context"]
    pd = receiver.at("/pd")[0].json()
    assert (pd["routing_key"], pd["event_action"], pd["dedup_key"]) == ("PDROUTINGKEY0001", "trigger", alert.alert_id)
    assert pd["payload"]["severity"] == "critical" and pd["payload"]["custom_details"]["percent_used"] == "100.01"


async def test_email_arrives_by_address_and_by_email_channel(settings, mailbox, tenant):
    insert_webhook(settings, tenant, "wh_mail", "email", email="finance@test.example")
    notifier = make_notifier(settings)
    try:
        alert = new_alert(tenant, ["oncall@test.example", "wh_mail"])
        assert await notifier.submit(alert) == {"oncall@test.example": "delivered", "wh_mail": "delivered"}
    finally:
        await notifier.close()
    mine = [(to, m) for to, m in mailbox.messages if m["X-Spendstream-Alert-Id"] == alert.alert_id]
    assert sorted(to[0] for to, _ in mine) == ["finance@test.example", "oncall@test.example"]
    for _, message in mine:
        assert message["Subject"].startswith("[Spendstream] Budget 'Research agents <daily>' crossed 80%")
        assert message["From"] == "spendstream@test.example"
        assert "Spent: 8.012345678 USD of 10.00 USD (80.12%)" in message.get_payload(decode=True).decode()
    assert {r["outcome"] for r in deliveries(settings, tenant)} == {"delivered"}


async def test_a_slow_endpoint_does_not_delay_another(settings, receiver, tenant):
    insert_webhook(settings, tenant, "wh_slow", "generic", receiver.script("/slow", [200], delay_s=1.0), SECRET)
    insert_webhook(settings, tenant, "wh_fast", "generic", receiver.script("/fast", [200]), SECRET)
    notifier = make_notifier(settings)
    try:
        # more alerts for the slow endpoint than it may serve at once, submitted first
        slow = [new_alert(tenant, ["wh_slow"]) for _ in range(PER_ENDPOINT_CONCURRENCY + 1)]
        both = new_alert(tenant, ["wh_slow", "wh_fast"])
        started = time.monotonic()
        slow_runs = [notifier.submit(a) for a in slow]
        both_run = notifier.submit(both)
        await wait_until(lambda: receiver.at("/fast"), "the fast endpoint's request")
        fast_latency = receiver.at("/fast")[0].at - started
        await asyncio.gather(*slow_runs, both_run)
    finally:
        await notifier.close()
    assert fast_latency < 0.5, f"fast endpoint waited {fast_latency:.2f} s behind the slow one"
    assert len(receiver.at("/slow")) == len(slow) + 1
    assert {r["outcome"] for r in deliveries(settings, tenant)} == {"delivered"}


async def test_timeouts_are_retried_and_retry_after_is_honoured(settings, receiver, tenant):
    insert_webhook(
        settings, tenant, "wh_429", "generic", receiver.script("/429", [429, 200], headers={"Retry-After": "1"})
    )
    insert_webhook(settings, tenant, "wh_hang", "generic", receiver.script("/hang", [200], delay_s=1.0))
    notifier = make_notifier(settings, policy=RetryPolicy(horizon_s=1.2, base_s=0.05, cap_s=0.1), timeout_s=0.5)
    try:
        assert await notifier.submit(new_alert(tenant, ["wh_429", "wh_hang"])) == {
            "wh_429": "delivered",
            "wh_hang": "gave_up",
        }
    finally:
        await notifier.close()
    first, second = receiver.at("/429")
    assert second.at - first.at >= 0.95
    rows = {(r["channel"], r["attempt"]): r for r in deliveries(settings, tenant)}
    assert rows[("wh_429", 1)]["http_status"] == 429 and rows[("wh_429", 2)]["outcome"] == "delivered"
    hang = sorted((a, r["outcome"], r["error"]) for (c, a), r in rows.items() if c == "wh_hang")
    assert len(hang) >= 2 and hang[-1][1] == "gave_up"
    assert all(o == "failed" and e == "timed out after 0.5 s" for _, o, e in hang[:-1])


async def test_non_retryable_answers_and_unknown_channels_are_final(settings, receiver, tenant):
    insert_webhook(settings, tenant, "wh_404", "generic", receiver.script("/gone", [404]))
    insert_webhook(settings, "someone_else", "wh_theirs", "generic", receiver.script("/theirs", [200]))
    insert_webhook(
        settings, tenant, "wh_future", "teams", receiver.script("/future", [200])
    )  # a format this version lacks
    notifier = make_notifier(settings)
    try:
        outcome = await notifier.submit(new_alert(tenant, ["wh_404", "wh_theirs", "wh_missing", "wh_future"]))
    finally:
        await notifier.close()
    assert outcome == {"wh_404": "gave_up", "wh_theirs": "refused", "wh_missing": "refused", "wh_future": "refused"}
    assert len(receiver.at("/gone")) == 1 and receiver.at("/theirs") == receiver.at("/future") == []
    rows = {r["channel"]: r for r in deliveries(settings, tenant)}
    assert rows["wh_404"]["error"] == "HTTP 404: nope (not retried)"
    assert rows["wh_theirs"]["error"].startswith("no such webhook")


async def test_private_targets_are_refused_at_delivery_time(settings, receiver, tenant):
    # accepted while loopback was allowed (or the name resolved elsewhere then): checked again now
    insert_webhook(settings, tenant, "wh_local", "generic", f"http://localhost:{receiver.port}/local")
    insert_webhook(settings, tenant, "wh_meta", "generic", "http://169.254.169.254/latest/meta-data/")
    notifier = make_notifier(settings, webhook={"allow_private": False})
    try:
        outcome = await notifier.submit(new_alert(tenant, ["wh_local", "wh_meta"]))
    finally:
        await notifier.close()
    assert outcome == {"wh_local": "refused", "wh_meta": "refused"}
    assert receiver.at("/local") == []
    errors = {r["channel"]: r["error"] for r in deliveries(settings, tenant)}
    assert "localhost resolves to" in errors["wh_local"] and "loopback" in errors["wh_local"]
    assert "169.254.169.254 is a link-local address" in errors["wh_meta"]


async def test_gives_up_after_the_retry_horizon(settings, receiver, tenant):
    insert_webhook(settings, tenant, "wh_down", "generic", receiver.script("/down", [503]))
    notifier = make_notifier(settings, policy=RetryPolicy(horizon_s=0.6, base_s=0.1, cap_s=0.2))
    try:
        started = time.monotonic()
        assert await notifier.submit(new_alert(tenant, ["wh_down"])) == {"wh_down": "gave_up"}
        took = time.monotonic() - started
    finally:
        await notifier.close()
    rows = deliveries(settings, tenant)
    assert [r["outcome"] for r in rows] == ["failed"] * (len(rows) - 1) + ["gave_up"]
    assert len(rows) == len(receiver.at("/down")) >= 2
    assert took < 2.0


async def test_resumes_from_the_record_and_never_resends_a_final_channel(settings, receiver, tenant):
    """What a restarted worker does with a replayed alert: channels already final are skipped;
    the others continue with the next attempt number."""
    insert_webhook(settings, tenant, "wh_done", "generic", receiver.script("/done", [200]))
    insert_webhook(settings, tenant, "wh_half", "generic", receiver.script("/half", [200]))
    alert = new_alert(tenant, ["wh_done", "wh_half"])
    store = DeliveryStore(settings, is_data_error=is_data_error)
    try:
        now = datetime.now(UTC)
        for channel, attempt, outcome, status in (("wh_done", 1, "failed", 500), ("wh_done", 2, "delivered", 200),
                                                  ("wh_half", 1, "failed", 502)):  # fmt: skip
            await store.record(
                Attempt(tenant, alert.alert_id, channel, "generic", attempt, now, outcome, status, "", 5)
            )
    finally:
        await store.close()
    notifier = make_notifier(settings)
    try:
        assert await notifier.submit(alert) == {"wh_done": "delivered", "wh_half": "delivered"}
        # the same alert again in this process: nothing is sent
        assert await notifier.submit(alert) == {}
    finally:
        await notifier.close()
    assert receiver.at("/done") == [] and len(receiver.at("/half")) == 1
    rows = [(r["channel"], r["attempt"], r["outcome"]) for r in deliveries(settings, tenant)]
    assert rows == [
        ("wh_done", 1, "failed"),
        ("wh_done", 2, "delivered"),
        ("wh_half", 1, "failed"),
        ("wh_half", 2, "delivered"),
    ]


async def test_the_same_alert_submitted_twice_at_once_is_delivered_once(settings, receiver, tenant):
    insert_webhook(settings, tenant, "wh_once", "generic", receiver.script("/once", [200], delay_s=0.2))
    notifier = make_notifier(settings)
    try:
        alert = new_alert(tenant, ["wh_once"])
        first, second = (
            notifier.submit(alert),
            notifier.submit(parse_alert(alert_value(alert.alert_id, tenant, ["wh_once"]))),
        )
        assert await first == await second == {"wh_once": "delivered"}
    finally:
        await notifier.close()
    assert len(receiver.at("/once")) == 1
    assert [r["outcome"] for r in deliveries(settings, tenant)] == ["delivered"]


async def test_an_alert_cancelled_on_handover_can_be_submitted_again_at_once(settings, receiver, tenant):
    """A revoked partition comes back: its alerts are submitted again before the cancelled runs unwound."""
    insert_webhook(settings, tenant, "wh_back", "generic", receiver.script("/back", [200]))
    notifier = make_notifier(settings)
    try:
        alert = new_alert(tenant, ["wh_back"])
        first = notifier.submit(alert)
        notifier.cancel([alert.alert_id])
        again = notifier.submit(alert)
        assert again is not first
        assert await again == {"wh_back": "delivered"}
        assert first.cancelled()
    finally:
        await notifier.close()
    assert len(receiver.at("/back")) == 1


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key)."""
    d = tmp_path_factory.mktemp("smtp-tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


def smtp_sender(settings, port: int, **smtp) -> Sender:
    return Sender(with_notify(settings, smtp={"host": "127.0.0.1", "port": port, **smtp}))


async def test_email_over_starttls_with_auth(settings, tenant, server_cert, monkeypatch):
    cert, key = server_cert
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    # the sender verifies the server against the default CA store: make it this certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    alert = new_alert(tenant, ["oncall@test.example"])
    channel = Channel("oncall@test.example", "email", email="oncall@test.example")
    with Mailbox(users={"alerts": "s3cret pass"}, tls_context=tls) as box:
        sender = smtp_sender(settings, box.port, starttls=True, username="alerts", password="s3cret pass")
        wrong = smtp_sender(settings, box.port, starttls=True, username="alerts", password="nope")
        cleartext = smtp_sender(settings, box.port, username="alerts", password="s3cret pass")
        try:
            delivered = await sender.send(channel, alert)
            refused = await wrong.send(channel, alert)
            no_tls = await cleartext.send(channel, alert)
        finally:
            for s in (sender, wrong, cleartext):
                await s.close()
    assert delivered.verdict == "delivered", delivered.error
    assert [m["X-Spendstream-Alert-Id"] for _, m in box.messages] == [alert.alert_id]
    # a wrong password is final (retrying cannot fix it); without STARTTLS nothing is sent in clear
    assert refused.verdict == "final" and refused.error.startswith("SMTP 535"), refused
    assert no_tls.verdict == "final" and "notify.smtp.starttls is off" in no_tls.error, no_tls
    # smtplib tries each mechanism the server offers before giving up on a password
    assert box.logins[0] == ("alerts", True) and set(box.logins[1:]) == {("alerts", False)}


async def test_starttls_refuses_an_untrusted_server_certificate(settings, tenant, server_cert):
    cert, key = server_cert
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    with Mailbox(tls_context=tls) as box:
        sender = smtp_sender(settings, box.port, starttls=True)
        try:
            result = await sender.send(Channel("a@test.example", "email", email="a@test.example"),
                                       new_alert(tenant, ["a@test.example"]))  # fmt: skip
        finally:
            await sender.close()
    assert result.verdict == "retry" and "CERTIFICATE_VERIFY_FAILED" in result.error, result
    assert box.messages == []
