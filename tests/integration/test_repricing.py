"""Re-pricing on the embedded ClickHouse: events of a model without a price over three days are
stored by the sink's own insert as ``unknown_model`` at cost 0; an override effective from day 1
is added; re-pricing then makes usage_events (read as clickhouse/README.md says) and every
aggregate of the registry equal a from-scratch pricing of the same events with the pricing core,
to the nano-USD. A dry run changes nothing and its diff is what the apply does; the same job run
again changes nothing; a job killed mid-way and run again ends in the same exact totals; a reader
during the apply sees each table's total move from old to new, never past it.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from stage_support import AGG_TABLES, MEASURES, TAGGED_TABLES, migrate

from spendstream.aggregates import AGGREGATES
from spendstream.clickhouse import get_client
from spendstream.contracts import priced_envelope, raw_envelope
from spendstream.pricing import OverrideBook, default_catalog, price
from spendstream.repricing import jobs, store
from spendstream.repricing.planner import Scope
from stream_processors.sink.logic import PricedRecord
from stream_processors.sink.writer import insert_records

pytestmark = pytest.mark.clickhouse

TENANT = "acme"
DAY1 = datetime(2026, 3, 1, tzinfo=UTC)
#: USD per million tokens of the override (decimal strings, as the API takes them)
OVERRIDE = {"input_mtok": "1.25", "output_mtok": "10", "cache_read_mtok": "0.125"}

#: usage_events read as documented: original rows count events, everything else is a plain sum
RAW_MEASURES = (
    "countIf(correction_kind = '')", "countIf(status = 'error' AND correction_kind = '')", "sum(input_tokens)",
    "sum(output_tokens)", "sum(cache_read_tokens)", "sum(cost_nanos)", "sum(cost_input_nanos)",
    "sum(cost_output_nanos)", "sum(cost_cache_read_nanos)", "sum(ifNull(latency_ms, 0))",
)  # fmt: skip


@pytest.fixture(scope="module")
def catalog():
    return default_catalog()


@pytest.fixture
def settings(make_settings):
    s = make_settings()
    migrate(s)
    return s


@pytest.fixture
def client(settings):
    c = get_client(settings)
    yield c
    c.close()


def _events(n: int, model: str, offset: int) -> list[dict]:
    """n events over three days (day 1 to day 3), tokens varying; every 7th an error."""
    return [
        {
            "event_id": f"{model}-{offset}-{i}",
            "timestamp": (DAY1 + timedelta(minutes=(i * 97) % (3 * 24 * 60), milliseconds=i))
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "agent": f"agent-{i % 3}",
            "user": f"user-{i % 5}",
            "tags": {"team": f"t{i % 2}", "env": "prod"} if i % 4 else {},
            "provider": "acme" if model == "mystery-1" else "openai",
            "model": model,
            "input_tokens": 1000 + 37 * i,
            "output_tokens": 100 + 11 * i,
            "cache_read_tokens": (7 * i) % 500,
            "latency_ms": 100 + i if i % 3 else None,
            "status": "error" if i % 7 == 0 else "ok",
        }
        for i in range(n)
    ]


def _store_priced(client, catalog, overrides, batches: list[list[dict]]) -> list[dict]:
    """Price each batch with the pricing core and store it with the sink's own insert (one
    usage.priced record per batch); the priced events."""
    priced_all = []
    for offset, events in enumerate(batches):
        priced = [{**e, **price(e, catalog, overrides).event_fields()} for e in events]
        raw = raw_envelope(TENANT, "proj", "2026-03-04T00:00:00.000Z", events)
        value = orjson.dumps(priced_envelope(raw, 0, offset, priced))
        record = PricedRecord(0, offset, 1_000, 0, offset, len(priced), value)
        insert_records(client, [record], token=f"usage.priced/0/{offset}-{offset}")
        priced_all += priced
    return priced_all


def _add_override(client) -> None:
    client.insert(
        "price_overrides",
        [[TENANT, "ov1", "acme", "mystery-1", DAY1, None, *(Decimal(v) for v in OVERRIDE.values()), "", DAY1, 0, 1]],
        column_names=["tenant", "id", "provider", "model", "effective_from", "effective_to", *OVERRIDE,
                      "note", "created_at", "deleted", "version"],
    )  # fmt: skip


def totals(client) -> dict[str, tuple[int, ...]]:
    """usage_events (read as documented) and every aggregate, as tests/stage_support.py compares them."""

    def first_row(sql: str) -> tuple[int, ...]:
        return tuple(int(x or 0) for x in client.query(sql).result_rows[0])

    out = {"usage_events": first_row(f"SELECT {', '.join(RAW_MEASURES)} FROM usage_events")}
    for table in AGG_TABLES:
        out[table] = first_row(f"SELECT {', '.join(f'sum({m})' for m in MEASURES)} FROM {table}")
    out["tags:usage_events"] = first_row(
        "SELECT sum(length(tags) * (correction_kind = '')), sum(length(tags) * cost_nanos) FROM usage_events"
    )
    for table in TAGGED_TABLES:
        out[f"tags:{table}"] = first_row(f"SELECT sum(calls), sum(cost_nanos) FROM {table}")
    unpriced = [a.table for a in AGGREGATES if "unpriced" in a.measure_names]
    out["unpriced"] = tuple(first_row(f"SELECT sum(unpriced) FROM {t}")[0] for t in unpriced)
    out["unpriced_models"] = first_row("SELECT sum(events) FROM unpriced_models")
    return out


def assert_consistent(t: dict[str, tuple[int, ...]]) -> None:
    for table in AGG_TABLES:
        assert t[table] == t["usage_events"], table
    for table in TAGGED_TABLES:
        assert t[f"tags:{table}"] == t["tags:usage_events"], table


def per_event_costs(client) -> dict[str, int]:
    """Each event's current cost, read as documented: the sum over its rows."""
    return {
        event_id: int(cost)
        for event_id, cost in client.query(
            "SELECT event_id, sum(cost_nanos) FROM usage_events GROUP BY event_id"
        ).result_rows
    }


def _scope() -> Scope:
    return Scope(TENANT, DAY1, DAY1 + timedelta(days=3))


def _new_job(scope: Scope) -> store.Job:
    return store.Job(TENANT, jobs.new_job_id(), actor="key-1", reason="late price", scope=scope.describe())


@pytest.fixture
def stored(client, catalog):
    """62 unknown events (day 1-3) and 20 catalog-priced ones; then the override."""
    batches = [_events(25, "mystery-1", 0), _events(20, "gpt-4o", 1), _events(37, "mystery-1", 2)]
    priced = _store_priced(client, catalog, None, batches)
    assert {e["pricing_status"] for e in priced if e["model"] == "mystery-1"} == {"unknown_model"}
    _add_override(client)
    book = OverrideBook.from_rows(store.override_rows(client, TENANT), catalog).for_tenant(TENANT)
    assert book, "the override is read back"
    # what a from-scratch pricing of the same events gives, with the pricing core
    expected = {e["event_id"]: price(e, catalog, book).cost_nanos for b in batches for e in b}
    assert sum(expected.values()) > sum(e["cost_nanos"] for e in priced)
    return priced, expected


def test_dry_run_changes_nothing_and_the_apply_does_what_it_said(client, settings, catalog, stored) -> None:
    priced, expected = stored
    before = totals(client)
    assert_consistent(before)
    tag_rows = sum(len(e["tags"]) for e in priced if e["model"] == "mystery-1")  # a row per tag in usage_tags_daily
    assert before["unpriced"] == (62, 62, 62, tag_rows) and before["unpriced_models"] == (62,)

    diff = jobs.dry_run(client, catalog, _scope(), batch_events=10, sample_size=5).to_json()
    assert totals(client) == before, "a dry run writes nothing"
    assert diff["events_scanned"] == 82 and diff["events_changed"] == 62
    assert diff["old_nanos"] == 0
    assert diff["new_nanos"] == sum(v for k, v in expected.items() if k.startswith("mystery-1"))
    assert [g["model"] for g in diff["by_model"]] == ["acme/mystery-1"]
    assert [g["day"] for g in diff["by_day"]] == ["2026-03-01", "2026-03-02", "2026-03-03"]
    assert sum(g["new_nanos"] for g in diff["by_day"]) == diff["new_nanos"]
    assert len(diff["sample"]) == 5 and diff["sample"][0]["new"]["pricing_status"] == "priced"

    reader = get_client(settings)  # the apply reads each next batch ahead, as the API's jobs do
    try:
        job = jobs.run(client, catalog, _new_job(_scope()), batch_events=10, sample_size=5, scan_client=reader)
    finally:
        reader.close()
    assert job.status == store.DONE and job.batches == 9
    assert store.public_diff(job.diff) == diff, "the apply changed exactly what the dry run said"

    after = totals(client)
    assert_consistent(after)
    assert per_event_costs(client) == expected, "every stored cost equals a from-scratch pricing"
    assert after["usage_events"][5] == sum(expected.values())
    assert after["unpriced"] == (0, 0, 0, 0) and after["unpriced_models"] == (0,)
    # tokens, calls, errors and latency did not move; only money did
    assert [x for i, x in enumerate(after["usage_events"]) if MEASURES[i].startswith("cost")] != [
        x for i, x in enumerate(before["usage_events"]) if MEASURES[i].startswith("cost")
    ]
    assert [x for i, x in enumerate(after["usage_events"]) if not MEASURES[i].startswith("cost")] == [
        x for i, x in enumerate(before["usage_events"]) if not MEASURES[i].startswith("cost")
    ]

    # the same job again, finished or resumed from scratch: nothing changes
    assert jobs.run(client, catalog, job, batch_events=10, sample_size=5) == job
    again = jobs.run(client, catalog, replace(job, status=store.RUNNING, cursor=store.START, batches=0, diff=None),
                     batch_events=10, sample_size=5)  # fmt: skip
    assert totals(client) == after and per_event_costs(client) == expected
    assert again.diff["events_changed"] == 62, "it recognises its own corrections"
    # and a new job over the same scope finds nothing to do
    assert jobs.dry_run(client, catalog, _scope(), batch_events=10, sample_size=5).events_changed == 0
    # the audit trail: started and done, with the totals
    audit = store.read_audit(client, TENANT)
    assert [(a["job_id"], a["status"]) for a in audit if a["status"] == "done"][-1] == (job.id, "done")
    done = next(a for a in audit if a["status"] == "done")
    assert (done["actor"], done["reason"], done["events_changed"]) == ("key-1", "late price", 62)
    assert (done["old_nanos"], done["new_nanos"]) == (0, diff["new_nanos"])


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not even the job's failure handling)."""


@pytest.mark.parametrize("when", ["after_saving", "between_insert_and_save"])
def test_a_job_killed_mid_way_and_rerun_ends_exact(client, settings, catalog, stored, monkeypatch, when) -> None:
    _, expected = stored
    dry = jobs.dry_run(client, catalog, _scope(), batch_events=7, sample_size=3).to_json()
    job = _new_job(_scope())
    saves = 0
    real_save = store.save_job

    def dying_save(c, j):
        nonlocal saves
        saves += 1
        if when == "between_insert_and_save" and j.batches == 4:
            raise Killed  # batch 4's rows are in, its cursor is not saved
        saved = real_save(c, j)
        if when == "after_saving" and j.batches == 4:
            raise Killed
        return saved

    monkeypatch.setattr(store, "save_job", dying_save)
    reader = get_client(settings)  # reading ahead when the job dies: the reader stops with it
    try:
        with pytest.raises(Killed):
            jobs.run(client, catalog, job, batch_events=7, sample_size=3, scan_client=reader)
    finally:
        reader.close()
    monkeypatch.setattr(store, "save_job", real_save)
    partial = store.load_job(client, TENANT, job.id)
    assert partial.status == store.RUNNING and partial.batches == 3 + (when == "after_saving")
    mid = totals(client)
    assert_consistent(mid)

    done = jobs.run(client, catalog, partial, batch_events=7, sample_size=3)
    assert done.status == store.DONE
    assert per_event_costs(client) == expected
    after = totals(client)
    assert_consistent(after)
    assert after["unpriced"] == (0, 0, 0, 0)
    for key in ("events_scanned", "events_changed", "old_nanos", "new_nanos", "by_model", "by_day"):
        assert done.diff[key] == dry[key], key


def test_a_reader_during_the_apply_never_sees_an_event_counted_twice(client, settings, catalog, stored) -> None:
    before = totals(client)
    old, new = before["usage_daily"][5], sum(stored[1].values())
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def read() -> None:
        reader = get_client(settings)
        try:
            while not stop.is_set():
                row = reader.query(
                    "SELECT (SELECT sum(cost_nanos) FROM usage_daily), (SELECT sum(cost_nanos) FROM usage_events)"
                )
                seen.append(tuple(int(x) for x in row.result_rows[0]))
        finally:
            reader.close()

    thread = threading.Thread(target=read)
    thread.start()
    try:
        jobs.run(client, catalog, _new_job(_scope()), batch_events=3, sample_size=1)
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 1
    for daily, raw in seen:
        # each batch moves whole events from old to new cost: never both counted, never past new
        assert old <= daily <= new and old <= raw <= new
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), "totals only move forward"
    assert totals(client)["usage_daily"][5] == new


ADMIN_KEY = "ss_test_admin_" + "r" * 24


def test_the_api_dry_runs_applies_reports_progress_and_audits(make_settings, catalog) -> None:
    import time

    from query_api_stack import admin_and_reader

    s = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT, repricing={"batch_events": 8})
    migrate(s)
    c = get_client(s)
    try:
        _store_priced(c, catalog, None, [_events(30, "mystery-1", 0)])
        with admin_and_reader(s, ADMIN_KEY, TENANT) as (_, admin, reader):
            put = admin.put(
                "/v1/pricing/overrides",
                json={"provider": "acme", "model": "mystery-1", "effective_from": "2026-03-01",
                      "per_mtok": {"input": "1.25", "output": "10", "cache_read": "0.125"}},
            )  # fmt: skip
            assert put.status_code == 200, put.text
            body = {"from": "2026-03-01", "to": "2026-03-04", "model": "mystery-1", "reason": "late price"}
            before = totals(c)
            dry = admin.post("/v1/pricing/reprice", json=body)
            assert dry.status_code == 200, dry.text
            diff = dry.json()["diff"]
            assert diff["events_changed"] == 30 and diff["new_nanos"] > 0
            # the override change proposed a re-price by itself (a dry run, nothing applied)
            proposal = put.json()["reprice"]["job_id"]
            deadline = time.monotonic() + 60
            while (proposed := reader.get(f"/v1/pricing/reprice/{proposal}")).status_code == 404:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert proposed.json()["status"] == "proposed" and proposed.json()["actor"].startswith("auto:")
            assert {k: proposed.json()["diff"][k] for k in ("events_changed", "new_nanos", "by_day")} == {
                k: diff[k] for k in ("events_changed", "new_nanos", "by_day")
            }
            assert totals(c) == before
            # bad input names the field; readers may not re-price
            bad = admin.post("/v1/pricing/reprice", json={**body, "to": "2026-02-01"})
            assert bad.status_code == 422 and "to" in bad.text
            assert admin.post("/v1/pricing/reprice", json={**body, "from": "yesterday-ish"}).status_code == 422
            assert reader.post("/v1/pricing/reprice", json=body).status_code == 403

            started = admin.post("/v1/pricing/reprice", json={**body, "dry_run": False})
            assert started.status_code == 202, started.text
            job_id = started.json()["id"]
            deadline = time.monotonic() + 60
            while (job := reader.get(f"/v1/pricing/reprice/{job_id}").json())["status"] != "done":
                assert job["status"] == "running" and time.monotonic() < deadline, job
                time.sleep(0.2)
            assert job["progress"]["batches"] == 4 and job["diff"] == diff
            after = totals(c)
            assert_consistent(after)
            assert after["usage_events"][5] == diff["new_nanos"] and after["unpriced"][0] == 0
            assert reader.get("/v1/pricing/unpriced").json()["models"] == []
            # /v1/events lists each event once, in its current state, paging by event; or as stored
            # with its corrections; the export likewise (docs/repricing.md)
            window = {"from": "2026-03-01", "to": "2026-03-04", "tz": "UTC"}
            listed, cursor = [], None
            while True:
                page = reader.get(
                    "/v1/analytics/events", params={**window, "limit": 7, **({"cursor": cursor} if cursor else {})}
                ).json()
                listed += page["events"]
                if not (cursor := page["next_cursor"]):
                    break
            assert len(listed) == len({e["event_id"] for e in listed}) == 30
            assert sum(e["cost_nanos"] for e in listed) == diff["new_nanos"]
            assert {e["pricing_status"] for e in listed} == {"priced"} and all(
                e["corrected_by"] == [job_id] for e in listed
            )
            stored = reader.get("/v1/analytics/events", params={**window, "limit": 100, "corrections": "true"}).json()
            assert {e["cost_nanos"] for e in stored["events"]} == {0}
            assert all([c["kind"] for c in e["corrections"]] == ["reversal", "repriced"] for e in stored["events"])
            net_csv = reader.get("/v1/analytics/export", params={**window, "format": "ndjson"})
            rows = [orjson.loads(line) for line in net_csv.text.splitlines()]
            assert len(rows) == 30 and sum(int(r["cost_nanos"]) for r in rows) == diff["new_nanos"]
            raw = reader.get("/v1/analytics/export", params={**window, "format": "ndjson", "corrections": "true"})
            rows = [orjson.loads(line) for line in raw.text.splitlines()]
            assert sorted(r["correction_kind"] for r in rows) == [""] * 30 + ["repriced"] * 30 + ["reversal"] * 30
            assert sum(int(r["cost_nanos"]) for r in rows) == diff["new_nanos"]
            # the same job again: nothing changes
            again = admin.post("/v1/pricing/reprice", json={**body, "dry_run": False, "job_id": job_id})
            assert again.status_code == 200 and again.json()["status"] == "done"
            assert totals(c) == after
            assert reader.get("/v1/pricing/reprice/nope").status_code == 404
            # confirming the proposal now: it finds everything re-priced already and changes nothing
            confirmed = admin.post("/v1/pricing/reprice", json={**body, "dry_run": False, "job_id": proposal})
            assert confirmed.status_code == 202, confirmed.text
            while (job := reader.get(f"/v1/pricing/reprice/{proposal}").json())["status"] != "done":
                assert time.monotonic() < deadline + 60, job
                time.sleep(0.2)
            assert job["diff"]["events_changed"] == 0 and totals(c) == after
            audit = reader.get("/v1/pricing/audit").json()["audit"]
            assert [a["status"] for a in audit if a["job_id"] == job_id] == ["done", "started"]
            done = next(a for a in audit if a["job_id"] == job_id and a["status"] == "done")
            assert done["reason"] == "late price" and done["new_nanos"] == diff["new_nanos"]
            assert "proposed" in [a["status"] for a in audit if a["job_id"] == proposal]
    finally:
        c.close()


#: a job in a process of its own, slowed down per batch so the test can SIGKILL it mid-way
_JOB_PROCESS = """
import sys, time
from spendstream.clickhouse import get_client
from spendstream.pricing import default_catalog
from spendstream.repricing import jobs, store
from spendstream.settings import Settings

client = get_client(Settings())
job = store.load_job(client, sys.argv[1], sys.argv[2])
jobs.run(client, default_catalog(), job, batch_events=4, sample_size=3, after_batch=lambda j: time.sleep(0.3))
"""


def test_a_sigkilled_job_process_rerun_ends_exact(settings, client, catalog, stored) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from spendstream.settings import settings_env

    _, expected = stored
    dry = jobs.dry_run(client, catalog, _scope(), batch_events=4, sample_size=3).to_json()
    job = store.save_job(client, _new_job(_scope()))
    proc = subprocess.Popen(
        [sys.executable, "-c", _JOB_PROCESS, TENANT, job.id], env={**os.environ, **settings_env(settings)},
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (store.load_job(client, TENANT, job.id).batches or 0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the job process ended early"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = store.load_job(client, TENANT, job.id)
    assert killed.status == store.RUNNING and 3 <= killed.batches < 21
    done = jobs.run(client, catalog, killed, batch_events=4, sample_size=3)
    assert done.status == store.DONE
    assert per_event_costs(client) == expected
    after = totals(client)
    assert_consistent(after)
    assert after["unpriced"] == (0, 0, 0, 0) and after["unpriced_models"] == (0,)
    for key in ("events_scanned", "events_changed", "old_nanos", "new_nanos", "by_model", "by_day"):
        assert done.diff[key] == dry[key], key
