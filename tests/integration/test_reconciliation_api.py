"""The query API's provider connections, collector jobs and reconciliation against the embedded
ClickHouse and a local fake of both providers' admin APIs (real shapes): connections CRUD with the
admin key never answered, logged or stored in clear; bad input 422 naming the field; and
reconciliation figures equal to an independent computation over the events written and the
fake's native reports, including spend seen on one side only."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from provider_fakes import FakeProviders, anthropic_cost, anthropic_usage, openai_cost, openai_usage
from query_api_stack import EVENT_COLUMNS, admin_and_reader, insert_events, migrate

from spendstream.clickhouse import get_client
from spendstream.collectors.connections import load_open_connections
from spendstream.collectors.registry import PROVIDERS
from spendstream.collectors.runner import collect, options_from_settings
from spendstream.money import format_usd
from spendstream.secrets import Keyring, generate_key

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "r" * 24
TENANT = "tenant_recon"
OPENAI_KEY = "sk-admin-RECON-" + "o" * 30
ANTHROPIC_KEY = "sk-ant-admin01-RECON-" + "a" * 30
NOW = datetime(2025, 12, 6, 10, 37, tzinfo=UTC)
D0 = datetime(2025, 12, 4, tzinfo=UTC)  # the three days D0, D0+1, D0+2


def ts(day: int, hour: int = 0) -> int:
    return int((D0 + timedelta(days=day, hours=hour)).timestamp())


@pytest.fixture(scope="module")
def api(make_settings):
    secret = generate_key("k1")
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT, secret_keys=secret)
    migrate(settings)
    with FakeProviders(openai_key=OPENAI_KEY, anthropic_key=ANTHROPIC_KEY, page_size=30) as fake:
        settings = settings.model_copy(update={"collectors": settings.collectors.model_copy(update={
            "openai_base_url": fake.base_url("openai"), "anthropic_base_url": fake.base_url("anthropic")})})  # fmt: skip
        with admin_and_reader(settings, ADMIN_KEY, TENANT) as (server, admin, reader):
            yield {
                "settings": settings,
                "admin": admin,
                "reader": reader,
                "fake": fake,
                "keyring": Keyring.parse(secret),
            }


def assert_names(response, field: str, status: int = 422) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.json()["field"] == field, response.text[:300]


BODY = {"provider": "openai", "name": "org", "admin_key": OPENAI_KEY}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"provider": "google"}, "provider"),
        ({"name": ""}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"admin_key": ""}, "admin_key"),
        ({"admin_key": "k" * 5000}, "admin_key"),
        ({"admin_key": "clé"}, "admin_key"),
        ({"backfill_days": 91}, "backfill_days"),
        ({"backfill_days": "30"}, "backfill_days"),
        ({"drift_threshold_pct": "NaN"}, "drift_threshold_pct"),
        ({"drift_threshold_usd": "-1"}, "drift_threshold_usd"),
        ({"channels": "wh_1"}, "channels"),
        ({"channels": ["x"] * 17}, "channels"),
        ({"project_map": ["proj"]}, "project_map"),
        ({"project_map": {"proj": ""}}, "project_map"),
    ],
)
def test_bad_connection_input_is_422_naming_the_field(api, change, field):
    response = api["admin"].post("/v1/provider-connections", json={**BODY, **change})
    assert_names(response, field)
    assert OPENAI_KEY not in response.text


def test_connections_need_admin_and_never_answer_the_key(api, caplog):
    caplog.set_level(logging.DEBUG)
    admin, reader = api["admin"], api["reader"]
    assert reader.post("/v1/provider-connections", json=BODY).status_code == 403
    created = admin.post("/v1/provider-connections", json={**BODY, "backfill_days": 2})
    assert created.status_code == 201, created.text
    conn = created.json()
    assert conn["provider"] == "openai" and conn["backfill_days"] == 2 and conn["drift_threshold_pct"] == "5"
    assert conn["drift_threshold_usd"] == "1" and conn["channels"] == []
    listed = admin.get("/v1/provider-connections")
    assert conn["id"] in [c["id"] for c in listed.json()["provider_connections"]]
    jobs = admin.get("/v1/collectors/jobs").json()["jobs"]
    assert {j["id"] for j in jobs if j["connection_id"] == conn["id"]} == {f"{conn['id']}:usage", f"{conn['id']}:costs"}
    assert admin.delete(f"/v1/provider-connections/{conn['id']}").status_code == 204
    assert admin.delete(f"/v1/provider-connections/{conn['id']}").status_code == 404
    assert conn["id"] not in [c["id"] for c in admin.get("/v1/provider-connections").json()["provider_connections"]]
    for response in (created, listed):
        assert OPENAI_KEY not in response.text and "ciphertext" not in response.text
    assert all(OPENAI_KEY not in r.getMessage() for r in caplog.records)


def test_a_job_runs_now_and_shows_in_history(api):
    admin, fake = api["admin"], api["fake"]
    fake.data["anthropic", "costs"][ts(0)] = [anthropic_cost("claude-sonnet-4-20250514", "50")]
    conn = admin.post("/v1/provider-connections", json={**BODY, "provider": "anthropic", "admin_key": ANTHROPIC_KEY,
                                                         "backfill_days": 1}).json()  # fmt: skip
    assert admin.post(f"/v1/collectors/jobs/{conn['id']}:nope/run").status_code == 404
    assert admin.post(f"/v1/collectors/jobs/{conn['id']}:costs/run").status_code == 202
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        runs = admin.get("/v1/collectors/history", params={"connection_id": conn["id"]}).json()["runs"]
        if runs:
            break
        time.sleep(0.2)
    assert runs[0]["status"] == "ok" and runs[0]["trigger"] == "manual" and runs[0]["dataset"] == "costs"
    status = admin.get("/v1/collectors/status").json()
    assert {"id": f"{conn['id']}:costs", "state": "ok"}.items() <= next(
        j for j in status["jobs"] if j["id"] == f"{conn['id']}:costs"
    ).items()
    assert admin.delete(f"/v1/provider-connections/{conn['id']}").status_code == 204
    fake.data["anthropic", "costs"].clear()


# ---------------------------------------------------------------- reconciliation on known data


def event(i: int, provider: str, model: str, project: str, when: datetime, cost_nanos: int, inp: int, out: int):
    row = dict.fromkeys(EVENT_COLUMNS, 0)
    row.update(tenant=TENANT, project=project, agent="a", user="", session_id="", operation="chat", tags={},
               provider=provider, model=model, input_tokens=inp, output_tokens=out, cost_nanos=cost_nanos,
               cost_input_nanos=cost_nanos, price_id="catalog:x", pricing_status="priced", price_source="catalog",
               status="ok", latency_ms=None, event_id=f"recon-{i}", timestamp=when, received_at=when)  # fmt: skip
    return row


def test_reconciliation_equals_an_independent_computation(api):
    admin, fake, settings = api["admin"], api["fake"], api["settings"]
    sonnet, gpt, mini = "claude-sonnet-4-20250514", "gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"
    # Spendstream's side: events (costs in nano-USD)
    events = [
        event(0, "openai", gpt, "proj_a", D0 + timedelta(hours=3), 1_000_000_000, 1000, 100),
        event(1, "openai", gpt, "proj_a", D0 + timedelta(hours=5), 200_000_000, 500, 50),
        event(2, "openai", gpt, "proj_a", D0 + timedelta(days=1, hours=2), 500_000_000, 300, 30),
        event(3, "anthropic", sonnet, "proj_a", D0 + timedelta(hours=1), 1_237_891_200, 3200, 500),
        event(4, "anthropic", sonnet, "proj_a", D0 + timedelta(days=2, hours=1), 2_000_000_000, 10, 10),
        event(5, "google", "gemini-2.5-pro", "proj_a", D0 + timedelta(hours=1), 7, 1, 1),  # no report: not compared
    ]
    insert_events(settings, events)
    # the providers' side (native shapes)
    fake.data["openai", "usage"].update({
        ts(0, 3): [openai_usage(gpt, "proj_a", "k1", input_tokens=1500, cached=500, output_tokens=150)],
        ts(1, 2): [openai_usage(gpt, "proj_a", "k1", input_tokens=300, output_tokens=30),
                   openai_usage(mini, "proj_b", "k2", input_tokens=90, output_tokens=9)],
    })  # fmt: skip
    fake.data["openai", "costs"].update({
        ts(0): [openai_cost(f"{gpt}, input", "proj_a", 0.9), openai_cost(f"{gpt}, output", "proj_a", 0.3)],
        ts(1): [openai_cost(f"{gpt}, input", "proj_a", 0.5), openai_cost(f"{mini}, input", "proj_b", 0.042)],
    })  # fmt: skip
    fake.data["anthropic", "usage"][ts(0, 1)] = [
        anthropic_usage(
            sonnet, "wrkspc_1", "ak", uncached=1500, read=200, write_5m=500, write_1h=1000, output_tokens=500
        )
    ]
    fake.data["anthropic", "costs"].update({ts(0): [anthropic_cost(sonnet, "123.78912")],
                                            ts(2): [anthropic_cost(sonnet, "250")]})  # fmt: skip

    maps = {"openai": {"proj_b": "search"}, "anthropic": {"wrkspc_1": "proj_a", "": "proj_a"}}
    for provider, key in (("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)):
        body = {
            "provider": provider,
            "name": provider,
            "admin_key": key,
            "backfill_days": 3,
            "project_map": maps[provider],
        }
        created = admin.post("/v1/provider-connections", json=body)
        assert created.json()["project_map"] == maps[provider]
        client = get_client(settings)
        try:
            (conn,), _ = load_open_connections(client, api["keyring"], ids=[created.json()["id"]])
            for dataset in PROVIDERS[provider].datasets:
                assert collect(client, conn, dataset, options_from_settings(settings), now=NOW)["status"] == "ok"
        finally:
            client.close()

    answer = admin.get("/v1/reconciliation", params={"from": "2025-12-04", "to": "2025-12-06", "by": "model"})
    assert answer.status_code == 200, answer.text
    got = {(r["date"], r["provider"], r["model"]): r for r in answer.json()["rows"]}

    # independent computation
    tracked = defaultdict(lambda: [0, 0, 0])
    for e in events:
        if e["provider"] in ("openai", "anthropic"):
            t = tracked[e["timestamp"].date().isoformat(), e["provider"], e["model"]]
            t[0] += e["cost_nanos"]
            t[1] += e["input_tokens"]
            t[2] += e["output_tokens"]
    reported = defaultdict(lambda: [0, 0, 0])
    for (provider, dataset), buckets in fake.data.items():
        for start, results in buckets.items():
            d = datetime.fromtimestamp(start, UTC).date().isoformat()
            for r in results:
                if dataset == "costs" and provider == "openai":
                    key = (d, provider, r["line_item"].split(",")[0])
                    reported[key][0] += int(Decimal(repr(r["amount"]["value"])) * 10**9)
                elif dataset == "costs":
                    reported[d, provider, r["model"]][0] += int(Decimal(r["amount"]) * 10**7)
                elif provider == "openai":
                    reported[d, provider, r["model"]][1] += r["input_tokens"]
                    reported[d, provider, r["model"]][2] += r["output_tokens"]
                else:
                    c = r["cache_creation"]
                    reported[d, provider, r["model"]][1] += (r["uncached_input_tokens"] + r["cache_read_input_tokens"]
                                                              + sum(c.values()))  # fmt: skip
                    reported[d, provider, r["model"]][2] += r["output_tokens"]
    assert set(got) == set(tracked) | set(reported)
    for key in got:
        t, r, row = tracked.get(key, [0, 0, 0]), reported.get(key, [0, 0, 0]), got[key]
        diff = r[0] - t[0]
        drift = None if r[0] == 0 else str((Decimal(diff) * 100 / r[0]).quantize(Decimal("0.01"), ROUND_HALF_EVEN))
        assert row["tracked_cost_usd"] == format_usd(t[0]) and row["reported_cost_usd"] == format_usd(r[0]), key
        assert row["difference_usd"] == format_usd(diff) and row["drift_pct"] == drift, key
        assert (row["tracked_input_tokens"], row["tracked_output_tokens"]) == (t[1], t[2]), key
        assert (row["reported_input_tokens"], row["reported_output_tokens"]) == (r[1], r[2]), key
    # spot checks written out: Anthropic cents, a day with drift, unattributed spend
    assert got["2025-12-04", "anthropic", sonnet]["reported_cost_usd"] == "1.2378912"
    assert got["2025-12-04", "anthropic", sonnet]["difference_usd"] == "0"
    assert got["2025-12-06", "anthropic", sonnet]["drift_pct"] == "20.00"  # $2.50 reported, $2 tracked
    unseen = got["2025-12-05", "openai", mini]
    assert unseen["seen_by"] == "provider_only" and unseen["unattributed_cost_usd"] == "0.042"

    # by project: the providers' project / workspace ids through each connection's project_map
    by_project = admin.get("/v1/reconciliation", params={"from": "2025-12-04", "to": "2025-12-06", "by": "project"})
    assert by_project.status_code == 200, by_project.text
    got_p = {(r["date"], r["provider"], r["project"]): r for r in by_project.json()["rows"]}
    tracked_p = defaultdict(lambda: [0, 0, 0])
    for e in events:
        if e["provider"] in ("openai", "anthropic"):
            t = tracked_p[e["timestamp"].date().isoformat(), e["provider"], e["project"]]
            t[0] += e["cost_nanos"]
            t[1] += e["input_tokens"]
            t[2] += e["output_tokens"]
    reported_p = defaultdict(lambda: [0, 0, 0])
    for (provider, dataset), buckets in fake.data.items():
        for start, results in buckets.items():
            d = datetime.fromtimestamp(start, UTC).date().isoformat()
            for r in results:
                raw = (r.get("project_id") if provider == "openai" else r.get("workspace_id")) or ""
                at = reported_p[d, provider, maps[provider].get(raw, raw)]
                if dataset == "costs":
                    cents = Decimal(repr(r["amount"]["value"])) * 100 if provider == "openai" else Decimal(r["amount"])
                    at[0] += int(cents * 10**7)
                elif provider == "openai":
                    at[1] += r["input_tokens"]
                    at[2] += r["output_tokens"]
                else:
                    c = r["cache_creation"]
                    at[1] += r["uncached_input_tokens"] + r["cache_read_input_tokens"] + sum(c.values())
                    at[2] += r["output_tokens"]
    assert set(got_p) == set(tracked_p) | set(reported_p)
    for key in got_p:
        t, r = tracked_p.get(key, [0, 0, 0]), reported_p.get(key, [0, 0, 0])
        assert got_p[key]["tracked_cost_usd"] == format_usd(t[0]) and got_p[key]["reported_cost_usd"] == format_usd(
            r[0]
        )
        assert (got_p[key]["tracked_input_tokens"], got_p[key]["reported_input_tokens"]) == (t[1], r[1]), key
    assert got_p["2025-12-05", "openai", "search"]["reported_cost_usd"] == "0.042"  # proj_b mapped
    assert got_p["2025-12-04", "anthropic", "proj_a"]["difference_usd"] == "0"  # the default workspace mapped

    # analysts' SQL reads the same current collections through the tenant views
    sql = admin.post("/v1/sql", json={"sql": "SELECT provider, sum(amount_nanos) FROM provider_costs_daily "
                                              "GROUP BY provider ORDER BY provider"})  # fmt: skip
    assert sql.status_code == 200, sql.text
    by_provider = defaultdict(int)
    for (_, provider, _), (cost, _, _) in reported.items():
        by_provider[provider] += cost
    assert [tuple(r) for r in sql.json()["rows"]] == [(p, by_provider[p]) for p in sorted(by_provider)]
    tokens = admin.post("/v1/sql", json={"sql": "SELECT sum(input_tokens) FROM provider_usage_hourly"})
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["rows"][0][0] == sum(r[1] for r in reported.values())

    for bad, field in (({"by": "agent"}, "by"), ({"granularity": "hour"}, "granularity"),
                       ({"from": "2025-13-01"}, "from"), ({"from": "2020-01-01", "to": "2025-01-01"}, "from")):  # fmt: skip
        assert_names(admin.get("/v1/reconciliation", params=bad), field)


def test_connections_per_tenant_are_bounded(api, monkeypatch):
    from spendstream.collectors import connections

    admin = api["admin"]
    live = len(admin.get("/v1/provider-connections").json()["provider_connections"])
    monkeypatch.setattr(connections, "MAX_PER_TENANT", live + 1)
    first = admin.post("/v1/provider-connections", json=BODY)
    assert first.status_code == 201, first.text
    assert_names(admin.post("/v1/provider-connections", json=BODY), "provider", status=409)
    assert admin.delete(f"/v1/provider-connections/{first.json()['id']}").status_code == 204


def test_a_body_that_is_not_an_object_is_a_4xx(api):
    for body in ([BODY], "x", 3):
        response = api["admin"].post("/v1/provider-connections", json=body)
        assert response.status_code == 422, response.text
        assert OPENAI_KEY not in response.text
    garbled = api["admin"].post(
        "/v1/provider-connections", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert garbled.status_code == 422
