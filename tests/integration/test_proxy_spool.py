"""Broker stopped mid-run: calls of the real SDKs through the proxy are still answered at once, their
usage events wait in the on-disk spool, and once the broker is back every call is exactly one event
on usage.raw."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from gateway_support import events_by_id, read_raw, wait_until
from proxy_support import FakeUpstream, GatewayServer, anthropic_sdk, openai_sdk, proxy_settings

from spendstream.clickhouse import get_client
from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.keys import create_key
from spendstream.topics import BUDGET_STATE, USAGE_RAW, ensure_topics

pytestmark = [pytest.mark.clickhouse, pytest.mark.kafka]


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, so stopping it does not disturb the session's."""
    broker = EmbeddedKafka(log_path=tmp_path / "tansu.log").start()
    yield broker
    broker.stop()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}_total ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_calls_during_a_broker_outage_become_exactly_one_event_each(make_settings, unique_name, own_broker):
    tenant = unique_name("t")
    with FakeUpstream() as upstream:
        settings = proxy_settings(
            make_settings,
            kafka={"bootstrap_servers": own_broker.bootstrap, "send_timeout_s": 1.0},
            proxy={"openai_base_url": upstream.url + "/v1", "anthropic_base_url": upstream.url},
        )
        await ensure_topics(settings, (USAGE_RAW, BUDGET_STATE))
        client = get_client(settings)
        try:
            _, key = create_key(client, tenant, "ingest", "fleet")
        finally:
            client.close()
        own = {"X-Spendstream-Key": key}  # passthrough: the caller's own provider key
        with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url) as http:
            state = gw.app.state

            async def started() -> bool:  # broker usable, budgets read (this tenant has none)
                return await state.publisher.ready() and state.budget_view.budgets_loaded

            await wait_until(started, timeout=20)
            own_broker.stop()
            ids, slowest = [], 0.0
            async with (
                openai_sdk(gw.url, "sk-own", default_headers=own) as oa,
                anthropic_sdk(gw.url, "sk-ant-own", default_headers=own) as an,
            ):
                for i in range(6):
                    started = time.monotonic()
                    if i % 2:
                        raw = await an.messages.with_raw_response.create(
                            model="claude-sonnet-4-5", max_tokens=10, stream=i == 3, messages=[]
                        )
                    else:
                        raw = await oa.chat.completions.with_raw_response.create(
                            model="gpt-4o", messages=[], stream=i == 2
                        )
                    await raw.http_response.aread()  # the whole answer, streams included
                    slowest = max(slowest, time.monotonic() - started)
                    assert raw.http_response.status_code == 200
                    ids.append(raw.headers["x-spendstream-request-id"])
            # answered without waiting for the broker (its send timeout is 1 s)
            assert slowest < 0.9, slowest

            async def spooled() -> bool:
                return _metric(http.get("/metrics").text, "spendstream_proxy_events_spooled") == len(ids)

            await wait_until(spooled, timeout=20)
            spool_dir = state.proxy.recorder._spool.dir
            assert list(spool_dir.glob("*.ndjson"))
            own_broker.start()  # memory only: an empty broker; the publisher recreates the topic

            async def drained() -> bool:
                return not list(spool_dir.glob("*.ndjson"))

            await wait_until(drained, timeout=30)
            metrics = http.get("/metrics").text
        found = await read_raw(settings, tenant, len(ids))
    events = [ev for _, envelope in found for ev in envelope["events"]]
    assert sorted(ev["event_id"] for ev in events) == sorted(ids)  # each exactly once
    by_id = events_by_id(found)
    assert by_id[ids[1]]["input_tokens"] == 13050 and by_id[ids[2]]["input_tokens"] == 2006
    assert _metric(metrics, "spendstream_proxy_events_drained") == len(ids)
    assert _metric(metrics, "spendstream_proxy_events_dropped") == 0
