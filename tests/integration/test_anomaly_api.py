"""Anomaly settings (GET/PUT /v1/anomaly-settings: defaults, round trip, field-naming 4xx, what the
stage reads) and anomaly alerts in GET /v1/alerts with their explanation."""

from __future__ import annotations

import time

import pytest
from query_api_stack import admin_and_reader, migrate

from spendstream.anomaly import Rule
from spendstream.anomaly.alerts import anomaly_alert_value
from spendstream.anomaly.detector import Anomaly, ModelExcess, anomaly_alert_id
from spendstream.anomaly.store import load_episodes, load_rules
from spendstream.budgets.store import insert_alerts
from spendstream.clickhouse import get_client

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "c" * 24
TENANT = "tenant_anomaly"
T = 1_780_000_000_000 - 1_780_000_000_000 % 60_000


@pytest.fixture(scope="module")
def api(make_settings):
    settings = make_settings(bootstrap_admin_key=ADMIN_KEY, bootstrap_tenant=TENANT)
    migrate(settings)
    with admin_and_reader(settings, ADMIN_KEY, TENANT) as (_, admin, reader):
        yield {"settings": settings, "admin": admin, "reader": reader}


def an_anomaly(start_ms: int) -> Anomaly:
    return Anomaly(
        tenant=TENANT, project="p1", agent="a1", alert_id=anomaly_alert_id(TENANT, "p1", "a1", start_ms),
        episode_start_ms=start_ms, minute_ms=start_ms + 60_000, window_start_ms=start_ms - 480_000,
        window_end_ms=start_ms + 120_000, window_nanos=490_000_000, usual_window_nanos=100_000_000, ratio=4.9,
        score=250.0, excess_nanos=390_000_000, minute_nanos=200_000_000, usual_minute_nanos=10_000_000,
        episode_nanos=400_000_000, usual_episode_nanos=20_000_000, episode_ratio=20.0, spike_type="size",
        calls=20, usual_calls=20.0, calls_ratio=1.0, tokens_per_call=20_000.0, usual_tokens_per_call=1000.0,
        size_ratio=20.0, nanos_per_token=1.0, usual_nanos_per_token=1.0, price_ratio=1.0,
        models=(ModelExcess("openai/gpt-4o", 400_000_000, 20_000_000, 380_000_000, 1.0),),
        event_ids=("e1", "e2"), seasonality="hour_of_day", baseline_samples=420, extreme=True,
    )  # fmt: skip


def test_settings_defaults_round_trip_and_what_the_stage_reads(api):
    admin, reader = api["admin"], api["reader"]
    got = reader.get("/v1/anomaly-settings").json()
    assert got["defaults"] is True and got["enabled"] is True and got["min_excess_usd"] == "1.000000000"
    body = {"enabled": True, "score_threshold": 5, "min_ratio": 4, "min_excess_usd": "0.25", "extreme_ratio": 30,
            "channels": ["oncall@example.com"], "muted": ["batch", "p1/noisy"]}  # fmt: skip
    put = admin.put("/v1/anomaly-settings", json=body)
    assert put.status_code == 200, put.text
    got = reader.get("/v1/anomaly-settings").json()
    assert got == {**body, "score_threshold": 5.0, "min_ratio": 4.0, "extreme_ratio": 30.0,
                   "min_excess_usd": "0.250000000", "defaults": False}  # fmt: skip
    client = get_client(api["settings"])
    try:
        rule = load_rules(client)[TENANT]
    finally:
        client.close()
    assert rule == Rule(True, 5.0, 4.0, 250_000_000, 30.0, ("oncall@example.com",), ("batch", "p1/noisy"))
    assert rule.mutes("batch", "x") and rule.mutes("p1", "noisy") and not rule.mutes("p1", "a1")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"min_excess_usd": "abc"}, "min_excess_usd"),
        ({"min_excess_usd": "-1"}, "min_excess_usd"),
        ({"score_threshold": 0}, "score_threshold"),
        ({"min_ratio": "x"}, "min_ratio"),
        ({"channels": ["no-such-webhook"]}, "channels"),
        ({"muted": ["a\nb"]}, "muted"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(api, change, field):
    r = api["admin"].put("/v1/anomaly-settings", json={**change})
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text


def test_reader_cannot_change_settings(api):
    assert api["reader"].put("/v1/anomaly-settings", json={}).status_code == 403


def test_anomaly_alerts_are_listed_with_their_explanation_and_restore_as_episodes(api):
    now_ms = int(time.time() * 1000)
    value = anomaly_alert_value(an_anomaly(T), ("oncall@example.com",), now_ms)
    client = get_client(api["settings"])
    try:
        insert_alerts(client, [value, value])  # a re-send collapses
        episodes = load_episodes(client, now_ms - 60_000)
    finally:
        client.close()
    assert [(e.project, e.agent, e.start_ms, e.alert_id) for e in episodes] == [("p1", "a1", T, value["alert_id"])]
    listed = api["reader"].get("/v1/alerts", params={"kind": "anomaly"}).json()["alerts"]
    assert len(listed) == 1
    a = listed[0]
    assert a["kind"] == "anomaly" and a["alert_id"] == value["alert_id"] and a["threshold"] is None
    assert a["scope"] == {"project": "p1", "agent": "a1"}
    assert a["spent_usd"] == "0.490000000" and a["limit_usd"] == "0.100000000" and a["percent_used"] == "490"
    assert a["anomaly"]["spike_type"] == "size" and a["anomaly"]["size_ratio"] == 20.0
    assert a["anomaly"]["ratio"] == 20.0 and a["anomaly"]["event_ids"] == ["e1", "e2"]
    assert a["anomaly"]["models"][0]["share"] == 1.0
    assert api["reader"].get("/v1/alerts", params={"kind": "threshold"}).json()["alerts"] == []
    assert api["reader"].get("/v1/alerts", params={"kind": "nope"}).status_code == 422


def test_baselines_load_from_the_aggregates_with_a_bounded_number_of_scopes(api):
    """usage_minute / usage_hourly -> baselines: per tenant only the agents (and projects) with the
    most spend, up to max_series_per_tenant; a project's baseline sums all its agents."""
    from datetime import UTC, datetime

    from spendstream.anomaly.baseline import DAY_MS, HOUR_MS, MINUTE_MS
    from spendstream.anomaly.store import load_baselines
    from spendstream.settings import AnomalySettings

    tenant = "tenant_baselines"
    hour = int(time.time() * 1000) // HOUR_MS * HOUR_MS
    cols = ["tenant", "bucket", "project", "agent", "provider", "model", "calls", "input_tokens", "cost_nanos"]
    minutes, hourly = [], []
    for agent, nanos in (("big", 3_000_000), ("mid", 2_000_000), ("tiny", 1_000_000)):
        hourly.append([tenant, datetime.fromtimestamp((hour - 8 * DAY_MS) / 1000, UTC), "p", agent, "openai",
                       "gpt-4o", 1, 1000, nanos * 60 * 24 * 8])  # fmt: skip
        for d in range(1, 8):
            for i in range(60):
                bucket = datetime.fromtimestamp((hour - d * DAY_MS + i * MINUTE_MS) / 1000, UTC)
                minutes.append([tenant, bucket, "p", agent, "openai", "gpt-4o", 2, 2000, nanos])
    client = get_client(api["settings"])
    try:
        client.insert("usage_minute", minutes, column_names=cols)
        client.insert("usage_hourly", hourly, column_names=cols)
        baselines = load_baselines(client, hour, AnomalySettings(max_series_per_tenant=2), {})
    finally:
        client.close()
    mine = {k: v for k, v in baselines.items() if k[0] == tenant}
    assert set(mine) == {(tenant, "p", "big"), (tenant, "p", "mid"), (tenant, "p", "")}
    assert mine[(tenant, "p", "big")].median == 3_000_000 and mine[(tenant, "p", "big")].samples == 420
    project = mine[(tenant, "p", "")]
    assert project.median == 6_000_000 and project.mean_calls == 6 and project.mean_tokens == 6000
    assert project.model_cost == {"openai/gpt-4o": 6_000_000.0}
