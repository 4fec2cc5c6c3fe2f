"""Provider collectors against a local fake of both admin APIs (tests/integration/provider_fakes.py,
the providers' documented shapes) writing into the embedded ClickHouse: multi-page answers, a 429
with retry-after, a revised bucket between two runs, a 90-day backfill, a failing run and its
recovery, no overlapping runs, and the admin key nowhere in clear text. Every stored figure is
compared with an independent computation over the fake's native data."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from provider_fakes import FakeProviders, anthropic_cost, anthropic_usage, openai_cost, openai_usage
from query_api_stack import migrate

from spendstream.clickhouse import get_client
from spendstream.collectors import store
from spendstream.collectors.connections import check_input, create_connection, load_open_connections
from spendstream.collectors.registry import PROVIDERS
from spendstream.collectors.runner import collect, options_from_settings
from spendstream.secrets import Keyring, generate_key

pytestmark = pytest.mark.clickhouse

TENANT = "tenant_collect"
OPENAI_KEY = "sk-admin-OPENAI-" + "q" * 24
ANTHROPIC_KEY = "sk-ant-admin01-ANTHROPIC-" + "z" * 24
NOW = datetime(2025, 12, 6, 10, 37, tzinfo=UTC)
H = 3600
D = 86400


def hour(n: int) -> int:
    """Unix start of the hour n hours before NOW's hour."""
    return int(NOW.replace(minute=0).timestamp()) - n * H


def day(n: int) -> int:
    return int(NOW.replace(hour=0, minute=0).timestamp()) - n * D


@pytest.fixture(scope="module")
def env(make_settings):
    secret = generate_key("k1")
    settings = make_settings(secret_keys=secret)
    migrate(settings)
    ch = get_client(settings)
    with FakeProviders(openai_key=OPENAI_KEY, anthropic_key=ANTHROPIC_KEY, page_size=24) as fake:
        settings = settings.model_copy(
            update={
                "collectors": settings.collectors.model_copy(
                    update={
                        "openai_base_url": fake.base_url("openai"),
                        "anthropic_base_url": fake.base_url("anthropic"),
                        "backoff_base_s": 0.01,
                        "backoff_max_s": 0.05,
                    }
                )
            }  # fmt: skip
        )
        yield {"settings": settings, "ch": ch, "fake": fake, "keyring": Keyring.parse(secret)}
    ch.close()


def connect(env, provider: str, days: int = 3):
    key = OPENAI_KEY if provider == "openai" else ANTHROPIC_KEY
    row = create_connection(env["ch"], env["keyring"], TENANT,
                            check_input({"provider": provider, "name": f"{provider} org", "admin_key": key,
                                         "backfill_days": days}))  # fmt: skip
    (conn,), failed = load_open_connections(env["ch"], env["keyring"], ids=[row["id"]])
    assert failed == 0 and conn.admin_key == key
    return conn


def run_all(env, conn, now=NOW, **kw):
    options = options_from_settings(env["settings"])
    return {ds.kind: collect(env["ch"], conn, ds, options, now=now, **kw) for ds in PROVIDERS[conn.provider].datasets}


# ---------------------------------------------------------------- independent expectations


def expected_usage(fake, provider: str, since: int, until: int) -> dict[tuple[int, str], tuple[int, int]]:
    """(bucket start, model) -> (input tokens incl. cache, output tokens), from the native results."""
    out: dict = defaultdict(lambda: (0, 0))
    for start, results in fake.data[provider, "usage"].items():
        if not since <= start < until:
            continue
        for r in results:
            if provider == "openai":
                inp = r["input_tokens"]
            else:
                c = r["cache_creation"]
                inp = (r["uncached_input_tokens"] + r["cache_read_input_tokens"]
                       + c["ephemeral_1h_input_tokens"] + c["ephemeral_5m_input_tokens"])  # fmt: skip
            a, b = out[start, r["model"]]
            out[start, r["model"]] = (a + inp, b + r["output_tokens"])
    return dict(out)


def expected_costs(fake, provider: str, since: int, until: int) -> dict[tuple[int, str], int]:
    out: dict = defaultdict(int)
    for start, results in fake.data[provider, "costs"].items():
        if not since <= start < until:
            continue
        for r in results:
            if provider == "openai":
                usd = Decimal(repr(r["amount"]["value"]))
                model = r["line_item"].split(",")[0]
            else:
                usd = Decimal(r["amount"]) / 100
                model = r["model"]
            out[start, model] += int((usd * 10**9).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    return dict(out)


def stored_usage(env, conn) -> dict[tuple[int, str], tuple[int, int]]:
    rows = (
        env["ch"]
        .query(
            f"SELECT toUnixTimestamp(bucket_start), model, sum(input_tokens), sum(output_tokens) "
            f"FROM {store.latest(store.USAGE_TABLE)} WHERE connection_id = {{c:String}} AND model != '' "
            "GROUP BY 1, 2",
            parameters={"tenant": TENANT, "c": conn.id},
        )
        .result_rows
    )
    return {(int(s), m): (int(i), int(o)) for s, m, i, o in rows}


def stored_costs(env, conn) -> dict[tuple[int, str], int]:
    rows = (
        env["ch"]
        .query(
            f"SELECT toUnixTimestamp(bucket_start), model, sum(amount_nanos) FROM {store.latest(store.COSTS_TABLE)} "
            "WHERE connection_id = {c:String} AND model != '' GROUP BY 1, 2",
            parameters={"tenant": TENANT, "c": conn.id},
        )
        .result_rows
    )
    return {(int(s), m): int(a) for s, m, a in rows}


def seed_openai(fake, hours: range, days: range) -> None:
    for n in hours:
        fake.data["openai", "usage"][hour(n)] = [
            openai_usage(
                "gpt-4o-2024-08-06", "proj_a", "key_1", input_tokens=1000 + n, cached=600, output_tokens=50 + n
            ),
            openai_usage("gpt-4o-mini-2024-07-18", "proj_b", "key_2", input_tokens=7 * n, output_tokens=n, requests=n),
        ]
    for n in days:
        fake.data["openai", "costs"][day(n)] = [
            openai_cost("gpt-4o-2024-08-06, input", "proj_a", 0.1 + n / 1000),
            openai_cost("gpt-4o-2024-08-06, output", "proj_a", 1.2345678912),
            openai_cost("gpt-4o-mini-2024-07-18, input", "proj_b", 0.000000333),
        ]


def seed_anthropic(fake, hours: range, days: range) -> None:
    for n in hours:
        fake.data["anthropic", "usage"][hour(n)] = [
            anthropic_usage("claude-sonnet-4-20250514", "wrkspc_1", "apikey_1", uncached=1500 + n, read=200,
                            write_5m=500, write_1h=1000, output_tokens=500 + n, searches=1),
            anthropic_usage("claude-3-5-haiku-20241022", None, None, uncached=300, output_tokens=80),
        ]  # fmt: skip
    for n in days:
        fake.data["anthropic", "costs"][day(n)] = [
            anthropic_cost("claude-sonnet-4-20250514", f"{123 + n}.78912", "wrkspc_1"),
            anthropic_cost("claude-3-5-haiku-20241022", "0.0000001", token_type="output_tokens"),
        ]


# ---------------------------------------------------------------- tests


def test_collection_is_exact_paged_throttled_and_idempotent(env):
    fake = env["fake"]
    seed_openai(fake, range(0, 80), range(0, 4))
    seed_anthropic(fake, range(0, 80), range(0, 4))
    openai_conn, anthropic_conn = connect(env, "openai"), connect(env, "anthropic")
    fake.throttle.append(("anthropic/usage", "1"))

    runs = run_all(env, openai_conn) | {f"a_{k}": v for k, v in run_all(env, anthropic_conn).items()}
    assert all(r["status"] == "ok" for r in runs.values()), runs
    # 3 days back from 10:00 to 11:00 of NOW's day: 73 hourly buckets in pages of 24
    assert runs["usage"]["buckets"] == 73 and runs["usage"]["pages"] == 4
    assert runs["a_usage"]["retries"] == 1
    throttled = fake.requests("anthropic", "usage")
    assert throttled[0]["status"] == 429 and throttled[1]["at"] - throttled[0]["at"] >= 1.0  # retry-after honoured
    assert [dict(r["params"]).get("page") is None for r in throttled[:2]] == [True, True]

    since_h, until_h = hour(72), hour(-1)
    since_d, until_d = day(3), day(-1)
    for conn in (openai_conn, anthropic_conn):
        p = conn.provider
        assert stored_usage(env, conn) == expected_usage(fake, p, since_h, until_h)
        assert stored_costs(env, conn) == expected_costs(fake, p, since_d, until_d)
    # Anthropic cents -> USD exactly: "123.78912" cents on NOW's day is $1.2378912
    assert stored_costs(env, anthropic_conn)[day(0), "claude-sonnet-4-20250514"] == 1_237_891_200

    def counts():
        return (
            env["ch"]
            .query(
                f"SELECT count(), sum(input_tokens) FROM {store.latest(store.USAGE_TABLE)}",
                parameters={"tenant": TENANT},
            )
            .result_rows[0]
        )

    before = counts()
    again = run_all(env, openai_conn, now=NOW + timedelta(minutes=10))
    assert again["usage"]["window_start"] < NOW - timedelta(hours=47)  # the last 48 h re-collected
    assert counts() == before  # nothing stored twice

    # the provider revises a recent bucket: one group changes, one disappears
    fake.data["openai", "usage"][hour(2)] = [
        openai_usage("gpt-4o-2024-08-06", "proj_a", "key_1", input_tokens=9999, cached=0, output_tokens=1)
    ]
    later = NOW + timedelta(hours=1)
    assert run_all(env, openai_conn, now=later)["usage"]["status"] == "ok"
    got = stored_usage(env, openai_conn)
    assert got[hour(2), "gpt-4o-2024-08-06"] == (9999, 1)
    assert (hour(2), "gpt-4o-mini-2024-07-18") not in got
    assert got == expected_usage(fake, "openai", since_h, hour(-2))


def test_a_90_day_backfill_stores_every_bucket_once_with_progress(env):
    fake = env["fake"]
    fake.data["anthropic", "costs"].clear()
    fake.data["anthropic", "usage"].clear()
    seed_anthropic(fake, range(0, 90 * 24, 7), range(0, 90))
    conn = connect(env, "anthropic", days=1)
    seen = []
    runs = run_all(
        env, conn, trigger="backfill", backfill_days=90, progress=lambda done, total: seen.append((done, total))
    )
    assert runs["costs"]["status"] == runs["usage"]["status"] == "ok"
    assert runs["costs"]["buckets"] == 91 and runs["costs"]["pages"] == 4  # the fake pages by 24
    assert seen[-1][0] == seen[-1][1] and len(seen) >= 3
    assert stored_costs(env, conn) == expected_costs(fake, "anthropic", day(90), day(-1))
    assert stored_usage(env, conn) == expected_usage(fake, "anthropic", hour(90 * 24 + 10), hour(-1))
    # a second backfill changes nothing
    run_all(env, conn, trigger="backfill", backfill_days=90)
    assert stored_costs(env, conn) == expected_costs(fake, "anthropic", day(90), day(-1))


def test_a_failing_run_is_recorded_and_the_next_recovers(env, caplog):
    fake = env["fake"]
    seed_openai(fake, range(0, 30), range(0, 2))
    conn = connect(env, "openai", days=1)
    fake.failing.add("openai/costs")
    caplog.set_level(logging.DEBUG)
    failed = run_all(env, conn)
    assert failed["costs"]["status"] == "error" and "HTTP 500" in failed["costs"]["error"]
    assert failed["usage"]["status"] == "ok"
    assert store.watermark(env["ch"], TENANT, conn.id, "costs") is None
    fake.failing.clear()
    recovered = run_all(env, conn, now=NOW + timedelta(hours=1))
    assert recovered["costs"]["status"] == "ok"
    assert recovered["costs"]["window_start"] == datetime(2025, 12, 5, tzinfo=UTC)  # from the backfill start again
    assert stored_costs(env, conn) == expected_costs(fake, "openai", day(1), day(-1))
    history = store.history(env["ch"], TENANT, connection_id=conn.id)
    assert [(h["dataset"], h["status"]) for h in history].count(("costs", "error")) == 1
    # a revoked admin key: 401 fails at once (no retries), recorded, the key never echoed
    wrong = "sk-admin-REVOKED-" + "w" * 20
    bad = create_connection(env["ch"], env["keyring"], TENANT, check_input({"provider": "openai", "name": "old",
                                                                          "admin_key": wrong}))  # fmt: skip
    (bad_conn,), _ = load_open_connections(env["ch"], env["keyring"], ids=[bad["id"]])
    refused = run_all(env, bad_conn)
    assert [(r["status"], r["retries"]) for r in refused.values()] == [("error", 0), ("error", 0)]
    assert all("HTTP 401" in r["error"] and wrong not in r["error"] for r in refused.values())
    assert all(k not in r.getMessage() for r in caplog.records for k in (OPENAI_KEY, wrong))


def test_runs_of_one_connection_never_overlap(env):
    fake = env["fake"]
    conn = connect(env, "anthropic", days=1)
    options = options_from_settings(env["settings"])
    dataset = PROVIDERS["anthropic"].datasets[1]
    fake.delay_s = 0.5
    try:
        results = []
        first = threading.Thread(target=lambda: results.append(collect(env["ch"], conn, dataset, options, now=NOW)))
        first.start()
        time.sleep(0.2)
        second = collect(env["ch"], conn, dataset, options, now=NOW)
        first.join()
    finally:
        fake.delay_s = 0.0
    assert second["status"] == "skipped" and results[0]["status"] == "ok"


def test_the_admin_keys_are_in_no_table_in_clear(env):
    ch = env["ch"]
    db = env["settings"].clickhouse.database
    tables = [
        r[0]
        for r in ch.query(
            f"SELECT name FROM system.tables WHERE database = '{db}' AND engine NOT LIKE '%View%'"
        ).result_rows
    ]
    assert "provider_connections" in tables and "collector_runs" in tables
    for table in tables:
        text = ch.raw_query(f"SELECT * FROM `{table}` FORMAT TSV").decode("utf-8", "replace")
        for key in (OPENAI_KEY, ANTHROPIC_KEY):
            assert key not in text, table
            assert key.encode().hex() not in text, table


def test_the_schedule_follows_the_issue_and_never_overlaps(env):
    from apscheduler.schedulers.background import BackgroundScheduler

    from spendstream.collectors.service import schedule

    scheduler = schedule(env["settings"], BackgroundScheduler(timezone=UTC))
    jobs = {j.id: j for j in scheduler.get_jobs()}
    assert set(jobs) == {"collect-openai", "collect-anthropic"}
    after = datetime(2025, 12, 6, 10, 37, tzinfo=UTC)
    openai_fires, anthropic_fires, t_o, t_a = [], [], after, after
    for _ in range(3):
        t_o = jobs["collect-openai"].trigger.get_next_fire_time(None, t_o + timedelta(seconds=1))
        t_a = jobs["collect-anthropic"].trigger.get_next_fire_time(None, t_a + timedelta(seconds=1))
        openai_fires.append(t_o.strftime("%d %H:%M"))
        anthropic_fires.append(t_a.strftime("%d %H:%M"))
    assert openai_fires == ["06 12:10", "06 18:10", "07 00:10"]
    assert anthropic_fires == ["06 11:05", "06 12:05", "06 13:05"]
    assert all(j.max_instances == 1 and j.coalesce for j in jobs.values())


def test_a_provider_job_collects_every_live_connection(env):
    from spendstream.collectors.service import run_provider

    fake = env["fake"]
    a, b = connect(env, "openai", days=1), connect(env, "openai", days=1)
    runs = run_provider(env["settings"], "openai", trigger="manual")
    mine = [(r["connection_id"], r["dataset"], r["status"]) for r in runs if r["connection_id"] in (a.id, b.id)]
    assert sorted(mine) == sorted((c.id, d, "ok") for c in (a, b) for d in ("usage", "costs"))
    assert fake.requests("openai", "usage")


def test_cli_backfill_shows_progress_and_stores_the_figures(env):
    from typer.testing import CliRunner

    from spendstream.cli import app
    from spendstream.devstack import child_env

    fake = env["fake"]
    # the CLI collects back from the real clock: data around today
    today = int(datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    for n in range(0, 12):
        fake.data["anthropic", "costs"][today - n * D] = [anthropic_cost("claude-opus-4-1-20250805", f"{n}.5", "w")]
    conn = connect(env, "anthropic", days=0)
    result = CliRunner().invoke(
        app, ["collectors", "backfill", "--connection", conn.id, "--days", "10", "--dataset", "costs"],
        env=child_env(env["settings"]),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "anthropic costs: ok" in result.output and "11/11" in result.output  # the bar: 10 days back + today
    assert ANTHROPIC_KEY not in result.output
    assert stored_costs(env, conn) == expected_costs(fake, "anthropic", today - 10 * D, today + D)
    bad = CliRunner().invoke(app, ["collectors", "backfill", "--connection", "pc_nope"], env=child_env(env["settings"]))
    assert bad.exit_code == 2 and "no live connection" in bad.output


def test_a_drifting_day_raises_exactly_one_reconciliation_alert(env):
    import asyncio

    from query_api_stack import EVENT_COLUMNS, insert_events
    from stage_support import read_topic

    from spendstream.alerting.payloads import parse_alert
    from spendstream.collectors.alerts import alert_id
    from spendstream.collectors.service import run_provider
    from spendstream.topics import BUDGET_ALERTS, ensure_topics

    settings, fake, ch = env["settings"], env["fake"], env["ch"]
    asyncio.run(ensure_topics(settings, (BUDGET_ALERTS,)))
    tenant = "tenant_drift"
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days = {n: today - timedelta(days=n) for n in (2, 3)}
    # tracked: $5 on day -3, $10 on day -2; reported: $5 and $12 (+$2, 16.67 %: over 5 % and $1)
    events = []
    for i, (n, nanos) in enumerate(((3, 5 * 10**9), (2, 10 * 10**9))):
        row = dict.fromkeys(EVENT_COLUMNS, 0)
        row.update(tenant=tenant, project="p", agent="a", user="", session_id="", operation="chat", tags={},
                   provider="openai", model="gpt-4o", cost_nanos=nanos, price_id="x", pricing_status="priced",
                   price_source="catalog", status="ok", latency_ms=None, event_id=f"drift-{i}",
                   timestamp=days[n] + timedelta(hours=5), received_at=days[n])  # fmt: skip
        events.append(row)
    insert_events(settings, events)
    fake.data["openai", "costs"][int(days[3].timestamp())] = [openai_cost("gpt-4o, input", "proj_x", 5.0)]
    fake.data["openai", "costs"][int(days[2].timestamp())] = [openai_cost("gpt-4o, input", "proj_x", 12.0)]
    created = create_connection(ch, env["keyring"], tenant, check_input({
        "provider": "openai", "name": "drift org", "admin_key": OPENAI_KEY, "backfill_days": 4, "channels": ["wh_ops"]}))  # fmt: skip

    for _ in range(2):  # a second run judges the same days again: no second alert
        runs = run_provider(settings, "openai")
        assert all(r["status"] == "ok" for r in runs if r["connection_id"] == created["id"])

    expected = alert_id(created["id"], days[2].date().isoformat())
    records = asyncio.run(
        read_topic(settings, BUDGET_ALERTS.name, lambda rs: any(r.key == expected.encode() for r in rs))
    )
    time.sleep(1.0)
    records = asyncio.run(read_topic(settings, BUDGET_ALERTS.name, lambda rs: len(rs) >= len(records), timeout=5))
    mine = [parse_alert(r.value) for r in records if parse_alert(r.value).tenant == tenant]
    assert [a.alert_id for a in mine] == [expected]
    alert = mine[0]
    assert alert.kind == "reconciliation" and alert.channels == ("wh_ops",)
    assert (alert.fields["reported_usd"], alert.fields["tracked_usd"], alert.fields["drift_pct"]) == (
        "12",
        "10",
        "16.67",
    )
    history = ch.query(
        "SELECT alert_id, kind, spent_nanos, limit_nanos FROM budget_alerts FINAL WHERE tenant = {t:String}",
        parameters={"t": tenant},
    ).result_rows
    assert history == [(expected, "reconciliation", 12 * 10**9, 10 * 10**9)]


def test_the_service_process_starts_its_schedule_and_stops_on_sigterm(env, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from spendstream.devstack import child_env

    log_path = tmp_path / "collectors.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "collectors", "run"],
            env={**os.environ, **child_env(env["settings"])}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "collect anthropic" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert "collect openai usage and costs" in text and "cron[" in text
    assert OPENAI_KEY not in text and ANTHROPIC_KEY not in text
