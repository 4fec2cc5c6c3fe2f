"""Query API: /v1/webhooks (create with SSRF check, list/get with secrets masked, delete, test
delivery to a real receiver) and /v1/alerts (history with delivery status), tenant-scoped."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from notify_support import Receiver, deliveries
from query_api_stack import QueryApiServer, migrate

from spendstream.alerting import IDEMPOTENCY_HEADER, PAGERDUTY_EVENTS_URL, SIGNATURE_HEADER, verify_signature
from spendstream.clickhouse import get_client
from spendstream.keys import create_key

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "n" * 24
TENANT = "notify_tenant"
UTC = UTC


@pytest.fixture(scope="module")
def api(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT,
                             notify={"timeout_s": 2.0, "webhook": {"allow_private": True}})  # fmt: skip
    migrate(settings)
    client = get_client(settings)
    try:
        _, read_key = create_key(client, TENANT, ["read"], "reader")
        _, other_key = create_key(client, "other_tenant", ["read", "admin"], "other")
    finally:
        client.close()
    with QueryApiServer(settings) as server:
        yield {"settings": settings, "url": server.url, "read": read_key, "other": other_key}


def client(api, key: str = ADMIN_KEY) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api["url"], headers={"Authorization": f"Bearer {key}"}, timeout=30)


def recorded_attempts(api, alert_id: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "alert_id"} for row in deliveries(api["settings"], TENANT)
            if row["alert_id"] == alert_id]  # fmt: skip


async def test_generic_webhook_lifecycle_and_signed_test_delivery(api):
    async with Receiver() as receiver, client(api) as admin, client(api, api["read"]) as reader:
        created = await admin.post("/v1/webhooks", json={"url": receiver.url("/hook?token=abc"), "format": "generic"})
        assert created.status_code == 201, created.text
        body = created.json()
        webhook_id, secret = body["id"], body["secret"]
        assert webhook_id.startswith("wh_") and secret.startswith("whsec_") and len(secret) > 30
        assert body["url"] == receiver.url("/hook?****")

        listed = (await reader.get("/v1/webhooks")).json()["webhooks"]
        [mine] = [w for w in listed if w["id"] == webhook_id]
        assert mine["secret"] == "****" + secret[-4:] and mine["format"] == "generic"
        assert (await reader.get(f"/v1/webhooks/{webhook_id}")).json() == mine

        tested = await admin.post(f"/v1/webhooks/{webhook_id}/test")
        assert tested.status_code == 200, tested.text
        result = tested.json()
        assert result["delivered"] is True and result["http_status"] == 200 and result["error"] == ""
        [got] = receiver.at("/hook")
        assert verify_signature(secret, got.headers[SIGNATURE_HEADER], got.body, time.time())
        assert got.headers[IDEMPOTENCY_HEADER] == result["alert_id"]
        payload = got.json()
        assert payload["test"] is True and payload["tenant"] == TENANT and payload["alert_id"] == result["alert_id"]
        assert recorded_attempts(api, result["alert_id"]) == [
            {
                "channel": webhook_id,
                "format": "generic",
                "attempt": 1,
                "outcome": "delivered",
                "http_status": 200,
                "error": "",
            }
        ]

        assert (await reader.delete(f"/v1/webhooks/{webhook_id}")).status_code == 403
        assert (await admin.delete(f"/v1/webhooks/{webhook_id}")).status_code == 204
        assert (await reader.get(f"/v1/webhooks/{webhook_id}")).status_code == 404
        assert (await admin.delete(f"/v1/webhooks/{webhook_id}")).status_code == 404
        assert webhook_id not in [w["id"] for w in (await reader.get("/v1/webhooks")).json()["webhooks"]]


async def test_test_delivery_reports_a_failing_receiver(api):
    async with Receiver() as receiver, client(api) as admin:
        url = receiver.script("/broken", [503])
        webhook_id = (await admin.post("/v1/webhooks", json={"url": url, "secret": "my-own-secret-123"})).json()["id"]
        result = (await admin.post(f"/v1/webhooks/{webhook_id}/test")).json()
        assert (result["delivered"], result["result"], result["http_status"]) == (False, "retry", 503)
        assert result["error"] == "HTTP 503: nope"
        # a test is one attempt: recorded as given up, never retried
        assert recorded_attempts(api, result["alert_id"]) == [{"channel": webhook_id, "format": "generic", "attempt": 1,
                                                           "outcome": "gave_up", "http_status": 503, "error": "HTTP 503: nope"}]  # fmt: skip


async def test_secrets_and_slack_urls_are_masked(api):
    async with client(api) as admin:
        own = await admin.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h", "secret": "my-own-secret-123"})
        assert own.status_code == 201 and own.json()["secret"] == "****-123"
        slack = await admin.post(
            "/v1/webhooks", json={"url": "http://127.0.0.1:9/services/T000/B000/XXXXsecretXXXX", "format": "slack"}
        )
        assert slack.status_code == 201
        assert slack.json()["url"] == "http://127.0.0.1:9/****XXXX" and slack.json()["secret"] == ""


async def test_email_and_pagerduty_channels(api):
    async with client(api) as admin:
        email = await admin.post("/v1/webhooks", json={"email": "oncall@example.com"})
        assert email.status_code == 201 and (email.json()["format"], email.json()["email"], email.json()["url"]) == (
            "email",
            "oncall@example.com",
            "",
        )
        missing_key = await admin.post("/v1/webhooks", json={"format": "pagerduty"})
        assert missing_key.status_code == 422 and missing_key.json()["field"] == "secret"


@pytest.mark.parametrize(
    "body, field, message",
    [({"email": "not an address"}, "email", "not a plain e-mail address"),
     ({"email": "a@example.com\r\nBcc: x@example.com"}, "email", "not a plain e-mail address"),
     ({"email": "a@example.com", "url": "https://example.com/"}, "url", "either url or email"),
     ({"format": "email"}, "email", "required"),
     ({"format": "generic"}, "url", "required"),
     ({"url": "ftp://example.com/x"}, "url", "only http and https"),
     ({"url": "https://user:pw@example.com/x"}, "url", "credentials"),
     ({"url": "http://169.254.169.254/latest/meta-data/"}, "url", "link-local"),
     ({"url": "http://[::ffff:169.254.169.254]/"}, "url", "link-local"),
     ({"url": "http://0.0.0.0:8080/"}, "url", "unspecified"),
     ({"url": "https://no-such-host.invalid/x"}, "url", "cannot resolve"),
     ({"url": "https://example.com/", "secret": "short"}, "secret", "at least 8"),
     ({"url": "https://example.com/", "format": "teams"}, "format", "")],
)  # fmt: skip
async def test_invalid_channels_are_refused_naming_the_field(api, body, field, message):
    async with client(api) as admin:
        response = await admin.post("/v1/webhooks", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and message in response.json()["message"]


async def test_private_urls_are_refused_unless_allowed(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)  # the default: not allowed
    migrate(settings)
    with QueryApiServer(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            for url, kind in (("http://127.0.0.1:8080/hook", "loopback"), ("http://localhost/hook", "loopback"),
                              ("http://10.0.0.7/hook", "private"), ("http://[::1]/hook", "loopback"),
                              ("http://2130706433/hook", "loopback"), ("http://[fd00::1]/hook", "private")):  # fmt: skip
                response = await admin.post("/v1/webhooks", json={"url": url})
                assert response.status_code == 422, url
                assert response.json()["field"] == "url" and kind in response.json()["message"], response.json()
            listed = (await admin.get("/v1/webhooks")).json()["webhooks"]
    assert listed == []


async def test_pagerduty_defaults_to_the_events_api(api):
    async with client(api) as admin:
        response = await admin.post("/v1/webhooks", json={"format": "pagerduty", "secret": "R0UTING-KEY-0123456789"})
        if response.status_code == 422 and "cannot resolve" in response.json()["message"]:
            pytest.skip("no DNS in this environment: events.pagerduty.com does not resolve")
        assert response.status_code == 201, response.text
        assert response.json()["url"] == PAGERDUTY_EVENTS_URL and response.json()["secret"] == "****6789"


async def test_webhooks_are_tenant_scoped(api):
    async with client(api) as admin, client(api, api["other"]) as other:
        webhook_id = (await admin.post("/v1/webhooks", json={"email": "mine@example.com"})).json()["id"]
        assert (await other.get(f"/v1/webhooks/{webhook_id}")).status_code == 404
        assert (await other.post(f"/v1/webhooks/{webhook_id}/test")).status_code == 404
        assert (await other.delete(f"/v1/webhooks/{webhook_id}")).status_code == 404
        assert webhook_id not in [w["id"] for w in (await other.get("/v1/webhooks")).json()["webhooks"]]
        assert (await admin.get(f"/v1/webhooks/{webhook_id}")).status_code == 200


def _alert_row(alert_id: str, budget_id: str, fired_at: datetime, kind: str = "threshold", threshold: str = "80",
               tenant: str = TENANT) -> list:  # fmt: skip
    forecast = kind == "forecast"
    return [tenant, alert_id, kind, budget_id, f"name of {budget_id}", {"project": "p1"},
            fired_at.replace(hour=0, minute=0, second=0, microsecond=0), fired_at.replace(hour=23, minute=59),
            Decimal(0 if forecast else threshold), 8_012_345_678, 10_000_000_000, Decimal("80.1234"),
            12_400_000_000 if forecast else None, fired_at + timedelta(hours=3) if forecast else None,
            f"ev_{alert_id}", '[{"kind": "agent", "name": "a1", "spent_usd": "8.012345678"}]', fired_at]  # fmt: skip


ALERT_COLUMNS = ["tenant", "alert_id", "kind", "budget_id", "budget_name", "scope", "window_start", "window_end",
                 "threshold", "spent_nanos", "limit_nanos", "percent_used", "projected_nanos", "projected_at",
                 "event_id", "top", "fired_at"]  # fmt: skip
DELIVERY_COLUMNS = ["tenant", "alert_id", "channel", "format", "attempt", "attempted_at", "outcome", "http_status",
                    "error", "duration_ms"]  # fmt: skip


async def test_alert_history_with_delivery_status(api):
    t0 = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
    alerts = [
        _alert_row("al_a", "bud_1", t0),
        _alert_row("al_b", "bud_1", t0 + timedelta(hours=1), threshold="100"),
        _alert_row("al_c", "bud_2", t0 + timedelta(days=1), kind="forecast"),
        _alert_row("al_d", "bud_2", t0 + timedelta(days=2)),
        _alert_row("al_x", "bud_1", t0, tenant="other_tenant"),
    ]
    at = t0 + timedelta(seconds=1)
    attempts = [
        (TENANT, "al_a", "wh_1", "generic", 1, at, "failed", 500, "HTTP 500", 12),
        (TENANT, "al_a", "wh_1", "generic", 2, at, "delivered", 200, "", 9),
        (TENANT, "al_a", "ops@example.com", "email", 1, at, "delivered", None, "", 30),
        (TENANT, "al_b", "wh_1", "generic", 1, at, "delivered", 200, "", 9),
        (TENANT, "al_b", "wh_2", "slack", 1, at, "gave_up", 404, "HTTP 404 (not retried)", 9),
        (TENANT, "al_c", "wh_1", "generic", 1, at, "failed", 503, "HTTP 503", 9),
        # recorded twice (a replay after a restart): counted once
        (TENANT, "al_c", "wh_1", "generic", 1, at, "failed", 503, "HTTP 503", 9),
    ]
    ch = get_client(api["settings"])
    try:
        ch.insert("budget_alerts", alerts, column_names=ALERT_COLUMNS)
        ch.insert("alert_deliveries", [list(a) for a in attempts], column_names=DELIVERY_COLUMNS)
    finally:
        ch.close()
    async with client(api, api["read"]) as reader:
        everything = (await reader.get("/v1/alerts")).json()["alerts"]
        assert [a["alert_id"] for a in everything] == ["al_d", "al_c", "al_b", "al_a"]
        by_id = {a["alert_id"]: a for a in everything}
        a = by_id["al_a"]
        assert (a["spent_usd"], a["limit_usd"], a["threshold"], a["percent_used"]) == (
            "8.012345678",
            "10.000000000",
            "80",
            "80.1234",
        )
        assert a["scope"] == {"project": "p1"} and a["top"][0]["name"] == "a1" and a["event_id"] == "ev_al_a"
        assert a["fired_at"] == "2024-05-10T12:00:00.000+00:00" and a["delivery_status"] == "delivered"
        assert [(d["channel"], d["outcome"], d["attempts"]) for d in a["deliveries"]] == [
            ("ops@example.com", "delivered", 1),
            ("wh_1", "delivered", 2),
        ]
        assert by_id["al_b"]["delivery_status"] == "partial" and by_id["al_b"]["threshold"] == "100"
        c = by_id["al_c"]
        assert c["delivery_status"] == "retrying" and c["deliveries"][0]["attempts"] == 1
        assert c["deliveries"][0]["delivered_at"] is None
        assert (c["threshold"], c["projected_usd"]) == (None, "12.400000000")
        assert by_id["al_d"]["delivery_status"] == "none" and by_id["al_d"]["deliveries"] == []

        only_bud_1 = (await reader.get("/v1/alerts", params={"budget_id": "bud_1"})).json()["alerts"]
        assert [x["alert_id"] for x in only_bud_1] == ["al_b", "al_a"]
        window = (await reader.get("/v1/alerts", params={"from": "2024-05-10T12:30:00Z", "to": "2024-05-11"})).json()
        assert [x["alert_id"] for x in window["alerts"]] == ["al_c", "al_b"]
        assert [x["alert_id"] for x in (await reader.get("/v1/alerts", params={"limit": 1})).json()["alerts"]] == [
            "al_d"
        ]
        bad = await reader.get("/v1/alerts", params={"from": "yesterday"})
        assert bad.status_code == 422 and bad.json()["field"] == "from"
    async with client(api, api["other"]) as other:
        assert [x["alert_id"] for x in (await other.get("/v1/alerts")).json()["alerts"]] == ["al_x"]
