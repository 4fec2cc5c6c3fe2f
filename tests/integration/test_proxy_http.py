"""The proxy over real HTTP (uvicorn): a stream reaches the client as the upstream sends it (no
whole-response buffering), and a client that hangs up mid-stream still leaves one event."""

from __future__ import annotations

import time

import httpx
import pytest
from gateway_support import events_by_id, raw_position, read_raw
from proxy_support import FakeUpstream, GatewayServer, openai_headers
from query_api_stack import migrate

from spendstream.clickhouse import get_client
from spendstream.keys import create_key
from spendstream.topics import BUDGET_STATE, USAGE_RAW, ensure_topics

pytestmark = [pytest.mark.clickhouse, pytest.mark.kafka]


async def test_streams_are_forwarded_as_they_arrive_and_hang_ups_are_recorded(make_settings, unique_name):
    tenant = unique_name("t")
    with FakeUpstream() as upstream:
        settings = make_settings(proxy={"openai_base_url": upstream.url + "/v1"})
        migrate(settings)
        await ensure_topics(settings, (USAGE_RAW, BUDGET_STATE))
        client = get_client(settings)
        try:
            _, key = create_key(client, tenant, "ingest", "fleet")
        finally:
            client.close()
        headers = openai_headers("sk-own", **{"X-Spendstream-Key": key})
        since = await raw_position(settings)
        body = {"model": "slow-stream", "messages": [], "stream": True}
        with GatewayServer(settings) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                started = time.monotonic()
                async with http.stream("POST", "/proxy/openai/v1/chat/completions", json=body, headers=headers) as r:
                    assert r.status_code == 200
                    arrivals = []
                    async for chunk in r.aiter_raw():
                        arrivals.append((time.monotonic() - started, chunk))
                    complete = r.headers["x-spendstream-request-id"]
                # the first event came before the upstream's pause (1.5 s), the rest after it
                assert arrivals[0][0] < upstream.pause_s, arrivals[0][0]
                assert arrivals[-1][0] >= upstream.pause_s
                assert b"".join(c for _, c in arrivals).endswith(b"data: [DONE]\n\n")

                # a client that hangs up after the first event
                async with http.stream("POST", "/proxy/openai/v1/chat/completions", json=body, headers=headers) as r:
                    gone = r.headers["x-spendstream-request-id"]
                    async for _ in r.aiter_raw():
                        break
            events = events_by_id(await read_raw(settings, tenant, 2, since))
    assert events[complete]["status"] == "ok" and events[complete]["input_tokens"] == 2006
    assert events[gone]["status"] == "error"
