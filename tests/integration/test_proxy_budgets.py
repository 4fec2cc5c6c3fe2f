"""Hard budgets at the proxy: two gateway replicas (uvicorn, real HTTP), 40 concurrent clients of the
real ``openai`` and ``anthropic`` SDKs, one enforced budget. Spend settled stays within the limit
(the documented bound, docs/proxy.md: zero while the pipeline's lag stays under
``proxy.settled_hold_s``); denied calls never reach the upstream and are answered 402 in the
provider's shape with ``x-should-retry: false``: the SDKs, with their default retries, raise at
once after one HTTP attempt."""

from __future__ import annotations

import asyncio
import time

import anthropic
import openai
import pytest
from gateway_support import events_by_id, raw_position, read_raw, wait_until
from proxy_support import Attempts, FakeUpstream, GatewayServer, anthropic_sdk, openai_sdk, proxy_settings

from spendstream.budgets import Attribution, Budget
from spendstream.budgets.store import insert_budget
from spendstream.clickhouse import get_client
from spendstream.keys import create_key
from spendstream.ports import free_port
from spendstream.pricing import default_catalog, price
from spendstream.provider_keys import create_provider_key
from spendstream.secrets import Keyring, generate_key
from spendstream.topics import BUDGET_STATE, USAGE_RAW, ensure_topics

pytestmark = [pytest.mark.clickhouse, pytest.mark.kafka]

SECRET_KEYS = generate_key("kbudget")
LIMIT_NANOS = 500_000_000  # 0.50 USD: about 60% of what the 40 clients would spend
CLIENTS = 40
#: what SDKs retry (WIRE-CONTRACTS.md 0.4); a denial must be none of these
SDK_RETRIED = {408, 409, 429} | set(range(500, 600))


async def test_two_replicas_forty_clients_spend_within_the_limit(make_settings, unique_name):
    tenant = unique_name("t")
    stored_key = f"sk-budget-{tenant}"
    with FakeUpstream(chunk_delay_s=0.001, latency_s=0.02) as upstream:
        settings = proxy_settings(
            make_settings,
            secret_keys=SECRET_KEYS,
            proxy={"openai_base_url": upstream.url + "/v1", "anthropic_base_url": upstream.url, "replicas": 2},
            budgets={"reload_s": 0.2},
        )
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
        replica_b = settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"port": free_port()})})
        with GatewayServer(settings) as gw_a, GatewayServer(replica_b) as gw_b:
            for gw in (gw_a, gw_b):
                view = gw.app.state.budget_view

                async def loaded(view=view) -> bool:
                    return view.ready and view.index.has_tenant(tenant)

                await wait_until(loaded, timeout=20)

            attempts = Attempts()  # every HTTP request the 40 SDK clients send, retries included

            async def agent(i: int) -> list[tuple[int, dict, float]]:
                url = (gw_a, gw_b)[i % 2].url
                out = []
                if i % 4 == 3:
                    async with anthropic_sdk(url, key, attempts) as sdk:
                        for _ in range(3):
                            started = time.monotonic()
                            try:
                                await sdk.messages.create(
                                    model="claude-sonnet-4-5", max_tokens=200,
                                    messages=[{"role": "user", "content": prompt * 7}],
                                )  # fmt: skip
                                out.append((200, {}, time.monotonic() - started))
                            except anthropic.APIStatusError as exc:
                                out.append((exc.status_code, exc.body, time.monotonic() - started, exc))
                    return out
                async with openai_sdk(url, key, attempts) as sdk:
                    for _ in range(3):
                        started = time.monotonic()
                        try:
                            await sdk.chat.completions.create(
                                model="gpt-4o", max_tokens=50, messages=[{"role": "user", "content": prompt}]
                            )
                            out.append((200, {}, time.monotonic() - started))
                        except openai.APIStatusError as exc:
                            out.append((exc.status_code, exc.body, time.monotonic() - started, exc))
                return out

            results = [x for batch in await asyncio.gather(*(agent(i) for i in range(CLIENTS))) for x in batch]
            ok = [r for r in results if r[0] == 200]
            denied = [r for r in results if r[0] != 200]
            events = events_by_id(await read_raw(settings, tenant, len(ok), since))
            ledgers = [gw.app.state.proxy.ledger for gw in (gw_a, gw_b)]

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
    # the SDKs made one HTTP attempt per call, denied ones included (default max_retries: 2): they
    # raised at once instead of retrying after their backoff
    assert len(attempts.paths) == len(results) == CLIENTS * 3
    for status, body, _, exc in denied:
        assert status == 402 and status not in SDK_RETRIED
        assert exc.response.headers["x-should-retry"] == "false"
        if isinstance(exc, anthropic.APIStatusError):
            assert isinstance(exc, anthropic.PaymentRequiredError) and body["type"] == "error"
        error = body["error"] if "error" in body else body  # openai's exception body is the error object
        assert error["type"] == "budget_exceeded" and "b_hard" in error["message"]
    assert all(ledger.open_reservations == 0 for ledger in ledgers)


async def test_soft_budgets_only_alert_and_unpriceable_calls_are_denied(make_settings, unique_name):
    tenant = unique_name("t")
    with FakeUpstream() as upstream:
        settings = proxy_settings(
            make_settings,
            proxy={"openai_base_url": upstream.url + "/v1", "anthropic_base_url": upstream.url},
            budgets={"reload_s": 0.2},
        )
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
        own = {"X-Spendstream-Key": key}  # passthrough: the caller's own provider keys
        with GatewayServer(settings) as gw:
            view = gw.app.state.budget_view

            async def loaded() -> bool:
                return view.ready and len(view.index.match(tenant, Attribution(project="guarded"))) == 2

            await wait_until(loaded, timeout=20)
            before = len(upstream.requests)
            async with openai_sdk(gw.url, "sk-own", default_headers=own) as sdk:
                soft = await sdk.chat.completions.create(model="gpt-4o", max_tokens=10, messages=[])
            assert soft.usage.prompt_tokens == 2006
            attempts = Attempts()
            guarded = {**own, "X-Spendstream-Project": "guarded"}
            async with anthropic_sdk(gw.url, "sk-ant-own", attempts, default_headers=guarded) as sdk:
                with pytest.raises(anthropic.PaymentRequiredError) as unknown:
                    await sdk.messages.create(model="claude-from-the-future", max_tokens=10, messages=[])
            assert unknown.value.response.headers["x-should-retry"] == "false" and len(attempts.paths) == 1
            body = unknown.value.body
            assert body["type"] == "error" and body["error"]["type"] == "budget_exceeded"
            assert "b_guard" in body["error"]["message"] and "no price" in body["error"]["message"]
            assert len(upstream.requests) == before + 1  # only the allowed call went out
