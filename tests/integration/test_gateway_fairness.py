"""The gateway's in-flight capacity is shared between tenants: while tenant A floods it with more
events than its share (``gateway.max_in_flight_tenant_share`` of ``max_in_flight_events``) can hold
waiting for acks, A gets 429 with Retry-After and tenant B's requests keep getting 202, their
events on usage.raw. Real gateway, real embedded broker, keys from the embedded ClickHouse."""

from __future__ import annotations

import asyncio

import pytest
from gateway_support import events_by_id, gateway, raw_position, read_raw  # tests/integration is on sys.path
from query_api_stack import migrate

from spendstream.clickhouse import get_client
from spendstream.keys import create_key

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

CAPACITY, SHARE = 40, 0.5  # A may hold 20 events waiting for acks; B always finds the other 20
A_WORKERS = 30  # each keeps one 2-event request waiting: 60 events, three times A's share
B_REQUESTS = 20


def events(prefix: str, i: int) -> list[dict]:
    return [{"event_id": f"{prefix}-{i}-{j}", "project": "p", "model": "openai/gpt-4o", "input_tokens": 1,
             "output_tokens": 1} for j in range(2)]  # fmt: skip


async def test_a_flooding_tenant_gets_429_while_another_keeps_getting_202(make_settings, unique_name):
    settings = make_settings(gateway={"max_in_flight_events": CAPACITY, "max_in_flight_tenant_share": SHARE})
    migrate(settings)
    tenant_a, tenant_b = unique_name("flood"), unique_name("quiet")
    client = get_client(settings)
    try:
        _, key_a = create_key(client, tenant_a, ["ingest"])
        _, key_b = create_key(client, tenant_b, ["ingest"])
    finally:
        client.close()
    auth_a, auth_b = {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}
    a_answers, b_answers = [], []
    b_done = asyncio.Event()
    async with gateway(settings) as gw:
        since = await raw_position(settings)

        async def flood(worker: int) -> None:
            i = 0
            while not b_done.is_set():
                answer = await gw.post("/v1/events", json=events(f"a{worker}", i), headers=auth_a)
                a_answers.append(answer)
                i += 1
                if answer.status_code == 429:
                    await asyncio.sleep(0.005)  # keeps the pressure on, without spinning the loop

        async def quiet() -> None:
            try:
                for i in range(B_REQUESTS):
                    b_answers.append(await gw.post("/v1/events", json=events("b", i), headers=auth_b))
            finally:
                b_done.set()

        workers = [asyncio.create_task(flood(w)) for w in range(A_WORKERS)]
        await asyncio.sleep(0)  # the flood is under way before B's first request
        await asyncio.wait_for(quiet(), 60)
        await asyncio.gather(*workers)

    assert [b.status_code for b in b_answers] == [202] * B_REQUESTS, [b.text for b in b_answers]
    statuses = [a.status_code for a in a_answers]
    assert set(statuses) == {202, 429}, statuses
    refused = [a for a in a_answers if a.status_code == 429]
    assert all(a.json()["error"] == "saturated" and a.headers["retry-after"] == "1" for a in refused)
    assert all("this tenant" in a.json()["message"] for a in refused)  # A's share, never the whole gateway
    published = events_by_id(await read_raw(settings, tenant_b, 2 * B_REQUESTS, since))
    assert {f"b-{i}-{j}" for i in range(B_REQUESTS) for j in range(2)} <= set(published)
