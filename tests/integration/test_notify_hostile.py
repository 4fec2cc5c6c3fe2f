"""Header injection and recipient lists, end to end.

The query API refuses e-mail channels that are not one plain address and control characters in
channel fields and budget channel entries (422 naming the field). The notify worker
(``spendstream processors --stages notify`` on a broker of its own, a real SMTP server) given
alerts that still carry such values (stored before the API refused them) records a refused
delivery with its reason or sends a safe one-line message, and goes on delivering the next alert.
"""

from __future__ import annotations

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from notify_support import Mailbox, NotifyWorker, Receiver, alert_value, deliveries, insert_webhook
from query_api_stack import QueryApiServer, migrate
from stage_support import wait_committed

from spendstream.alerting import IDEMPOTENCY_HEADER
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.kafka import producer_kwargs
from spendstream.topics import BUDGET_ALERTS, ensure_topics

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "h" * 24
TENANT = "hostile_tenant"
GROUP = "spendstream-notify"
INJECTED_NAME = "Evil\r\nBcc: attacker@evil.example\r\n\r\nforged body"
BUDGET = {"name": "b", "scope": {"project": "p"}, "window": "daily", "limit_usd": "10.00", "thresholds": [80]}


@pytest.fixture(scope="module")
def mailbox():
    with Mailbox() as box:
        yield box


def smtp_settings(mailbox: Mailbox) -> dict:
    return {"timeout_s": 2.0, "webhook": {"allow_private": True},
            "smtp": {"host": "127.0.0.1", "port": mailbox.port, "from_address": "spendstream@test.example"}}  # fmt: skip


# ------------------------------------------------------------------------------ query API


@pytest.fixture(scope="module")
def api(make_settings, mailbox):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT, notify=smtp_settings(mailbox))
    migrate(settings)
    with QueryApiServer(settings) as server:
        yield {"settings": settings, "url": server.url}


def admin(api) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api["url"], headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


@pytest.mark.parametrize(
    "email, reason",
    [("a@example.com, b@example.com", "one @"),
     ("a@example.com;b@example.com", "one @"),
     ("Boss <boss@example.com>", "display names"),
     ('"boss"@example.com', "quoting"),
     ("a(c)@example.com", "comments"),
     ("a@example.com\r\nBcc: c@example.com", "control character"),
     ("a@example.com\n", "control character"),
     ("a\x00@example.com", "control character"),
     ("a@example.com\u2028", "control character"),
     ("x" * 65 + "@example.com", "longer than 64"),
     ("a@" + "b" * 250 + ".com", "at most 254"),
     ("a@[127.0.0.1]", "name@example.com")],
)  # fmt: skip
async def test_email_channels_must_be_one_plain_address(api, email, reason):
    async with admin(api) as client:
        response = await client.post("/v1/webhooks", json={"email": email})
        listed = (await client.get("/v1/webhooks")).json()["webhooks"]
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "email" and reason in body["message"], body
    assert email not in [w["email"] for w in listed]


@pytest.mark.parametrize(
    "body, field, message",
    [({"url": "http://127.0.0.1:9/h\r\nX-Evil: 1"}, "url", "control characters"),
     ({"url": "http://127.0.0.1:9/h\x00"}, "url", "control characters"),
     # the IDNA codec refuses a 64-character label: answered 422, not a 500
     ({"url": "http://" + "a" * 64 + ".example/h"}, "url", "not a valid host name"),
     ({"url": "http://127.0.0.1:9/h", "secret": "secret-\r\nX-Evil: 1"}, "secret", "control character"),
     ({"format": "pagerduty", "url": "http://127.0.0.1:9/h", "secret": "ROUTING\nKEY-0123"}, "secret",
      "control character")],
)  # fmt: skip
async def test_control_characters_in_channel_fields_are_refused(api, body, field, message):
    async with admin(api) as client:
        response = await client.post("/v1/webhooks", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and message in response.json()["message"], response.json()


@pytest.mark.parametrize(
    "channel, message",
    [("a@example.com, b@example.com", "one @"),
     ("a@example.com\r\nBcc: c@example.com", "control character"),
     ("a@example.com\n", "control character"),
     ("Boss <boss@example.com>", "display names"),
     ("wh_0011223344556677\r\nX-Evil: 1", "control character")],
)  # fmt: skip
async def test_budget_channel_entries_with_lists_or_line_breaks_are_refused(api, channel, message):
    async with admin(api) as client:
        response = await client.post("/v1/budgets", json={**BUDGET, "channels": ["ok@example.com", channel]})
        fine = await client.post("/v1/budgets", json={**BUDGET, "channels": ["ok@example.com"]})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "channels" and message in response.json()["message"], response.json()
    assert fine.status_code == 201 and fine.json()["channels"] == ["ok@example.com"], fine.text


async def test_testing_a_stored_bad_email_channel_reports_it_refused(api, mailbox):
    # rows written before the API refused them: the test delivery refuses them too, and says why
    insert_webhook(api["settings"], TENANT, "wh_old_list", "email", email="a@test.example, b@test.example")
    insert_webhook(api["settings"], TENANT, "wh_old_crlf", "email", email="a@test.example\r\nBcc: c@test.example")
    before = len(mailbox.messages)
    async with admin(api) as client:
        listed = await client.post("/v1/webhooks/wh_old_list/test")
        crlf = await client.post("/v1/webhooks/wh_old_crlf/test")
    assert listed.status_code == crlf.status_code == 200, (listed.text, crlf.text)
    assert (listed.json()["result"], listed.json()["delivered"]) == ("refused", False)
    assert "recipient refused: exactly one address (one @) per channel" in listed.json()["error"]
    assert crlf.json()["result"] == "refused" and "control character" in crlf.json()["error"]
    assert len(mailbox.messages) == before


# ------------------------------------------------------------------------------ notify worker


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedKafka(log_path=tmp_path_factory.mktemp("hostile-kafka") / "tansu.log") as b:
        yield b


@pytest.fixture(scope="module")
def worker_settings(make_settings, broker, mailbox):
    s = make_settings(kafka={"bootstrap_servers": broker.bootstrap, "profile": "embedded", "partitions": 1},
                      notify=smtp_settings(mailbox))  # fmt: skip
    migrate(s)
    return s


@pytest.fixture(scope="module")
async def topic(worker_settings):
    await ensure_topics(worker_settings, (BUDGET_ALERTS,))
    producer = AIOKafkaProducer(**producer_kwargs(worker_settings))
    await producer.start()

    async def send(value: dict) -> None:
        # one record per batch: Tansu's end offsets are right for those (EMBEDDED-STACK.md)
        await producer.send_and_wait(BUDGET_ALERTS.name, orjson.dumps(value), key=value["alert_id"].encode(),
                                     partition=0)  # fmt: skip

    yield send
    await producer.stop()


@pytest.fixture(scope="module")
async def worker(worker_settings, topic, tmp_path_factory):
    notify = NotifyWorker(worker_settings, tmp_path_factory.mktemp("hostile-worker") / "notify.log")
    await notify.ready()
    yield notify
    notify.stop()


@pytest.mark.kafka
async def test_the_worker_refuses_or_defuses_hostile_alerts_and_delivers_the_next(worker_settings, topic, worker,
                                                                                   mailbox):  # fmt: skip
    s = worker_settings
    list_channel, crlf_channel = "a@test.example, b@test.example", "a@test.example\r\nBcc: c@test.example"
    async with Receiver() as receiver:
        insert_webhook(s, TENANT, "wh_ok", "generic", receiver.script("/ok", [200]), "s" * 16)
        insert_webhook(s, TENANT, "wh_list", "email", email=list_channel)
        insert_webhook(s, TENANT, "wh_crlf", "email", email=crlf_channel)
        await topic(alert_value("al_hostile_name", TENANT, ["oncall@test.example", "wh_ok"], budget_name=INJECTED_NAME))
        await topic(alert_value("al_hostile_channels", TENANT, [list_channel, crlf_channel, "wh_list", "wh_crlf"]))
        await topic(alert_value("al_after", TENANT, ["after@test.example", "wh_ok"]))
        # acked = every channel of all three final and recorded
        await wait_committed(s, GROUP, BUDGET_ALERTS.name, {0: 3}, timeout=60)
        hooked = {r.headers[IDEMPOTENCY_HEADER]: r.json() for r in receiver.at("/ok")}
    assert worker.proc.poll() is None, worker.log_path.read_text()[-3000:]
    assert "stopping the worker" not in worker.log_path.read_text()

    rows = {(r["alert_id"], r["channel"]): r for r in deliveries(s, TENANT)}
    outcomes = {key: r["outcome"] for key, r in rows.items()}
    assert outcomes == {
        ("al_hostile_name", "oncall@test.example"): "delivered", ("al_hostile_name", "wh_ok"): "delivered",
        ("al_hostile_channels", list_channel): "refused", ("al_hostile_channels", crlf_channel): "refused",
        ("al_hostile_channels", "wh_list"): "refused", ("al_hostile_channels", "wh_crlf"): "refused",
        ("al_after", "after@test.example"): "delivered", ("al_after", "wh_ok"): "delivered",
    }  # fmt: skip
    errors = {channel: r["error"] for (alert_id, channel), r in rows.items() if alert_id == "al_hostile_channels"}
    for channel in (list_channel, "wh_list"):
        assert "recipient refused: exactly one address (one @) per channel" in errors[channel]
    for channel in (crlf_channel, "wh_crlf"):
        assert "recipient refused: contains a control character" in errors[channel]

    mails = {m["X-Spendstream-Alert-Id"]: (to, m) for to, m in mailbox.messages}
    assert "al_hostile_channels" not in mails
    to, message = mails["al_hostile_name"]
    # one envelope recipient, no injected header, the name shown on one line
    assert to == ["oncall@test.example"] and message["Bcc"] is None and message.get_all("To") == ["oncall@test.example"]
    unfolded = message["Subject"].replace("\r\n", "")  # long headers are folded on the wire (RFC 5322 2.2.3)
    assert unfolded.startswith("[Spendstream] Budget 'Evil  Bcc: attacker@evil.example    forged body' crossed 80%")
    assert mails["al_after"][0] == ["after@test.example"]
    # the signed JSON carries the name as stored: JSON escapes it, and the receiver sees the truth
    assert hooked["al_hostile_name"]["budget_name"] == INJECTED_NAME and "al_after" in hooked
