"""Hard budgets at the proxy: two gateway replicas, 40 concurrent SDK-shaped clients, one enforced
budget. Spend settled stays within the limit (the documented bound, docs/proxy.md: zero while the
pipeline's lag stays under ``proxy.settled_hold_s``); denied calls never reach the upstream and are
answered 402 in the provider's shape with ``x-should-retry: false``, so the SDKs raise at once."""

from __future__ import annotations

import asyncio
import time

import pytest
from gateway_support import events_by_id, gateway, raw_position, read_raw, wait_until
from proxy_support import FakeUpstream, anthropic_headers, openai_headers
from query_api_stack import migrate

from spendstream.budgets import Attribution, Budget
from spendstream.budgets.store import insert_budget
from spendstream.clickhouse import get_client
from spendstream.keys import create_key
from spendstream.pricing import default_catalog, price
from spendstream.provider_keys import create_provider_key
from spendstream.secrets import Keyring, generate_key
from spendstream.topics import BUDGET_STATE, USAGE_RAW, ensure_topics

pytestmark = [pytest.mark.clickhouse, pytest.mark.kafka]

SECRET_KEYS = generate_key("k1")
LIMIT_NANOS = 500_000_000  # 0.50 USD: about 60% of what the 40 clients would spend
CLIENTS = 40
#: what SDKs retry (WIRE-CONTRACTS.md 0.4); a denial must be none of these
SDK_RETRIED = {408, 409, 429} | set(range(500, 600))


async def test_two_replicas_forty_clients_spend_within_the_limit(make_settings, unique_name):
    tenant = unique_name("t")
    stored_key = f"sk-budget-{tenant}"
    with FakeUpstream(chunk_delay_s=0.001, latency_s=0.02) as upstream:
        settings = make_settings(
            secret_keys=SECRET_KEYS,
            proxy={"openai_base_url": upstream.url + "/v1", "anthropic_base_url": upstream.url, "replicas": 2},
            budgets={"reload_s": 0.2},
        )
        migrate(settings)
        await ensure_topics(settings, (USAGE_RAW, BUDGET_STATE))
        client = get_client(settings)
        try:
            _, key = create_key(client, tenant, "ingest", "fleet")
            keyring = Keyring.parse(SECRET_KEYS)
            create_provider_key(client, keyring, tenant, "openai", "main", stored_key)
            create_provider_key(client, keyring, tenant, "anthropic", "main", stored_key)
            budget = Budget(tenant, "b_hard", "fleet hard cap", {}, "monthly", "UTC", LIMIT_NANOS, enforce=True)
            insert_budget(client, budget, 1)
        finally:
            client.close()
        since = await raw_position(settings)
        # a prompt as long as the tokens the fake upstream bills for it (2006): the reservation,
        # bounded by the body's bytes, then covers the call's real cost
        prompt = "x" * 2100
        async with gateway(settings) as gw_a, gateway(settings) as gw_b:
            for gw in (gw_a, gw_b):
                view = gw.app.state.budget_view  # type: ignore[attr-defined]

                async def loaded(view=view) -> bool:
                    return view.ready and view.index.has_tenant(tenant)

                await wait_until(loaded, timeout=20)

            async def agent(i: int) -> list[tuple[int, dict, dict, float]]:
                gw = (gw_a, gw_b)[i % 2]
                out = []
                for _ in range(3):
                    started = time.monotonic()
                    if i % 4 == 3:
                        r = await gw.post("/proxy/anthropic/v1/messages", headers=anthropic_headers(key), json={
                            "model": "claude-sonnet-4-5", "max_tokens": 200,
                            "messages": [{"role": "user", "content": prompt * 7}],
                        })  # fmt: skip
                    else:
                        r = await gw.post("/proxy/openai/v1/chat/completions", headers=openai_headers(key), json={
                            "model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": prompt}],
                        })  # fmt: skip
                    out.append((r.status_code, dict(r.headers), r.json(), time.monotonic() - started))
                return out

            results = [x for batch in await asyncio.gather(*(agent(i) for i in range(CLIENTS))) for x in batch]
            ok = [r for r in results if r[0] == 200]
            denied = [r for r in results if r[0] != 200]
            events = events_by_id(await read_raw(settings, tenant, len(ok), since))
            ledgers = [gw.app.state.proxy.ledger for gw in (gw_a, gw_b)]  # type: ignore[attr-defined]

    catalog = default_catalog()
    settled = sum(price(ev, catalog).cost_nanos for ev in events.values())
    print(f"\nbudget run: {len(ok)} allowed, {len(denied)} denied, settled {settled} of {LIMIT_NANOS} nano-USD")
    assert ok and denied, (len(ok), len(denied))
    assert settled <= LIMIT_NANOS, (settled, LIMIT_NANOS)
    # the budget was used, not refused wholesale: at least half of it was spent
    assert settled >= LIMIT_NANOS // 2, settled
    # every allowed call reached the upstream once; no denied call did
    mine = [
        r
        for r in upstream.requests
        if stored_key in (r["headers"].get("authorization", "") + r["headers"].get("x-api-key", ""))
    ]
    assert len(mine) == len(ok) == len(events)
    for status, headers, body, _ in denied:
        assert status == 402 and status not in SDK_RETRIED
        assert headers["x-should-retry"] == "false"
        error = body["error"]
        assert error["type"] == "budget_exceeded" and "b_hard" in error["message"]
        if "type" in body:  # Anthropic's envelope
            assert body["type"] == "error"
    assert all(ledger.open_reservations == 0 for ledger in ledgers)


async def test_soft_budgets_only_alert_and_unpriceable_calls_are_denied(make_settings, unique_name):
    tenant = unique_name("t")
    with FakeUpstream() as upstream:
        settings = make_settings(
            proxy={"openai_base_url": upstream.url + "/v1", "anthropic_base_url": upstream.url},
            budgets={"reload_s": 0.2},
        )
        migrate(settings)
        await ensure_topics(settings, (USAGE_RAW, BUDGET_STATE))
        client = get_client(settings)
        try:
            _, key = create_key(client, tenant, "ingest", "fleet")
            # exhausted by any call, but soft: it only alerts
            insert_budget(client, Budget(tenant, "b_soft", "soft", {}, "daily", "UTC", 1, enforce=False), 1)
            # hard, but only for project "guarded"
            scope = {"project": "guarded"}
            insert_budget(client, Budget(tenant, "b_guard", "guard", scope, "daily", "UTC", 10**9, enforce=True), 1)
        finally:
            client.close()
        own = {"X-Spendstream-Key": key}
        async with gateway(settings) as gw:
            view = gw.app.state.budget_view  # type: ignore[attr-defined]

            async def loaded() -> bool:
                return view.ready and len(view.index.match(tenant, Attribution(project="guarded"))) == 2

            await wait_until(loaded, timeout=20)
            before = len(upstream.requests)
            soft = await gw.post("/proxy/openai/v1/chat/completions", headers=openai_headers("sk-own", **own),
                                 json={"model": "gpt-4o", "max_tokens": 10, "messages": []})  # fmt: skip
            assert soft.status_code == 200
            unknown = await gw.post(
                "/proxy/anthropic/v1/messages",
                headers=anthropic_headers("sk-own", **own, **{"X-Spendstream-Project": "guarded"}),
                json={"model": "claude-from-the-future", "max_tokens": 10, "messages": []},
            )
            assert unknown.status_code == 402 and unknown.headers["x-should-retry"] == "false"
            body = unknown.json()
            assert body["type"] == "error" and body["error"]["type"] == "budget_exceeded"
            assert "b_guard" in body["error"]["message"] and "no price" in body["error"]["message"]
            assert len(upstream.requests) == before + 1  # only the allowed call went out
