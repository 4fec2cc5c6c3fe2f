"""The automatic trigger of a catalog update, on the embedded ClickHouse and a running query API:
events stored with the bundled catalog; the query API then starts with an updated catalog (one
model re-priced from a date, one model added; tests/fixtures/catalog_variants.py) through the same
``default_catalog`` the pricing stage uses. It proposes by itself, per affected tenant, a re-price
of the changed periods only (a dry run, nothing written); confirmed through the API, the stored
costs and aggregates equal a from-scratch pricing with the new catalog; a tenant without affected
events gets no proposal, and the same catalog at the next start proposes nothing.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from fixtures.catalog_variants import ADDED, REPRICED, REPRICED_FROM, updated_catalog
from stage_support import migrate

from spendstream.clickhouse import get_client
from spendstream.contracts import priced_envelope, raw_envelope
from spendstream.pricing import default_catalog, price
from spendstream.repricing import catalog_trigger
from stream_processors.sink.logic import PricedRecord
from stream_processors.sink.writer import insert_records

pytestmark = pytest.mark.clickhouse

DAY1 = datetime(2026, 3, 1, tzinfo=UTC)
ADMIN_KEY = "ss_test_admin_" + "c" * 24


def _events(tenant: str, model: str, n: int) -> list[dict]:
    return [
        {
            "event_id": f"{tenant}-{model}-{i}",
            "timestamp": (DAY1 + timedelta(minutes=(i * 211) % (3 * 24 * 60))).isoformat().replace("+00:00", "Z"),
            "provider": "openai",
            "model": model,
            "input_tokens": 1000 + 37 * i,
            "output_tokens": 100 + 11 * i,
            "cache_read_tokens": (7 * i) % 500,
        }
        for i in range(n)
    ]


def _store(client, catalog, tenant: str, events: list[dict], offset: int) -> None:
    priced = [{**e, **price(e, catalog, None).event_fields()} for e in events]
    raw = raw_envelope(tenant, "proj", "2026-03-04T00:00:00.000Z", events)
    value = orjson.dumps(priced_envelope(raw, 0, offset, priced))
    insert_records(client, [PricedRecord(0, offset, 1_000, 0, offset, len(priced), value)], token=f"t/{offset}")


def _wait(fetch, done, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not done(value := fetch()):
        assert time.monotonic() < deadline, f"{what}: {value}"
        time.sleep(0.2)
    return value


def test_a_catalog_update_proposes_the_changed_periods_and_confirming_reprices_exactly(
    make_settings, monkeypatch
) -> None:
    from query_api_stack import admin_and_reader

    old, new = default_catalog(), updated_catalog()
    s = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant="acme", repricing={"batch_events": 16})
    migrate(s)
    c = get_client(s)
    try:
        acme = _events("acme", REPRICED[1], 40) + _events("acme", "gpt-4o-mini", 10)
        beta = _events("beta", ADDED[1], 12)
        gamma = _events("gamma", "gpt-4o-mini", 10)
        for offset, (tenant, events) in enumerate((("acme", acme), ("beta", beta), ("gamma", gamma))):
            _store(c, old, tenant, events, offset)
        # the first start only records the catalog; the same catalog again changes nothing
        assert catalog_trigger.propose(c, old, batch_events=16, sample_size=3) == []
        assert catalog_trigger.propose(c, old, batch_events=16, sample_size=3) == []

        monkeypatch.setattr("query_api.app.default_catalog", lambda: new)
        with admin_and_reader(s, ADMIN_KEY, "acme") as (_, admin, reader):
            audit = _wait(
                lambda: reader.get("/v1/pricing/audit").json()["audit"],
                lambda a: any(r["status"] == "proposed" for r in a), "no proposal",
            )  # fmt: skip
            [proposal] = [r for r in audit if r["status"] == "proposed"]
            assert proposal["actor"] == "auto:catalog" and "gpt-4o" in proposal["reason"]
            job = reader.get(f"/v1/pricing/reprice/{proposal['job_id']}").json()
            assert job["status"] == "proposed"
            # only the changed period, from the change date to the day after the last event
            assert job["scope"]["from"].startswith(REPRICED_FROM.isoformat())
            assert job["scope"]["to"].startswith("2026-03-04")
            assert job["scope"]["catalog_changes"] == [
                {"model": "/".join(REPRICED), "from": REPRICED_FROM.isoformat(), "to": None, "kind": "repriced"}
            ]
            changed = [e for e in acme if e["model"] == REPRICED[1] and e["timestamp"] >= REPRICED_FROM.isoformat()]
            assert 0 < len(changed) < 40
            assert job["diff"]["events_changed"] == len(changed)
            assert job["diff"]["old_nanos"] == sum(price(e, old, None).cost_nanos for e in changed)
            assert job["diff"]["new_nanos"] == sum(price(e, new, None).cost_nanos for e in changed)
            acme_before = c.query("SELECT sum(cost_nanos) FROM usage_events WHERE tenant = 'acme'").result_rows[0][0]
            assert acme_before == sum(price(e, old, None).cost_nanos for e in acme), "a proposal writes nothing"

            body = {"from": job["scope"]["from"], "to": job["scope"]["to"], "reason": "confirm"}
            started = admin.post("/v1/pricing/reprice", json={**body, "dry_run": False, "job_id": job["id"]})
            assert started.status_code == 202, started.text
            done = _wait(
                lambda: reader.get(f"/v1/pricing/reprice/{job['id']}").json(), lambda j: j["status"] == "done", "job"
            )
            assert done["diff"]["events_changed"] == len(changed)

        # the other tenants: beta's unknown model is now in the catalog (proposed), gamma has none
        jobs_of = {
            t: c.query(
                "SELECT count() FROM reprice_jobs FINAL WHERE tenant = {t:String} AND actor = 'auto:catalog'",
                parameters={"t": t},
            ).result_rows[0][0]
            for t in ("beta", "gamma")
        }
        assert jobs_of == {"beta": 1, "gamma": 0}
        # stored costs and every daily aggregate equal a from-scratch pricing with the new catalog
        expected = sum(price(e, new, None).cost_nanos for e in acme)
        assert c.query("SELECT sum(cost_nanos) FROM usage_events WHERE tenant = 'acme'").result_rows[0][0] == expected
        for table in ("usage_minute", "usage_hourly", "usage_daily"):
            assert c.query(f"SELECT sum(cost_nanos) FROM {table} WHERE tenant = 'acme'").result_rows[0][0] == expected
        # the next start with the same catalog proposes nothing
        assert catalog_trigger.propose(c, new, batch_events=16, sample_size=3) == []
    finally:
        c.close()
