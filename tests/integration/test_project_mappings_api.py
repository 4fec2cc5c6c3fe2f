"""``/v1/project-mappings`` against the embedded ClickHouse (CRUD, admin only, validation naming
the field, per-tenant limit), rules written through it reaching a running gateway within seconds
(the seed examples, priority, the catch-all, delete), and the session fields as analytics
filters and breakdown dimensions."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from gateway_support import gateway
from query_api_stack import admin_and_reader, make_events, migrate

from spendstream.clickhouse import get_client

pytestmark = pytest.mark.clickhouse

ADMIN_KEY = "ss_test_admin_" + "m" * 24
TENANT = "tenant_mappings"
SEED = [
    {"pattern": "peakpaws-*", "project": "PeakPaws", "priority": 10, "field": "session_label"},
    {"pattern": "kanban-*", "project": "Kanban Board", "priority": 10, "field": "session_label"},
    {"pattern": "*", "project": "General", "priority": 0, "field": "session_label"},
]


@pytest.fixture(scope="module")
def api(make_settings):
    settings = make_settings(
        bootstrap_admin_key=ADMIN_KEY,
        bootstrap_tenant=TENANT,
        otel={"project_mappings_reload_s": 0.2, "max_project_mappings": 6},
    )
    migrate(settings)
    with admin_and_reader(settings, ADMIN_KEY, TENANT) as (_, admin, reader):
        yield {"settings": settings, "admin": admin, "reader": reader}


def test_crud_admin_only_and_validation(api):
    admin, reader = api["admin"], api["reader"]
    created = admin.post("/v1/project-mappings", json=SEED[0])
    assert created.status_code == 201, created.text
    rule = created.json()
    assert rule["id"].startswith("pm_") and {k: rule[k] for k in SEED[0]} == SEED[0]
    assert admin.get(f"/v1/project-mappings/{rule['id']}").json() == rule
    assert reader.get("/v1/project-mappings").status_code == 403
    assert reader.post("/v1/project-mappings", json=SEED[1]).status_code == 403

    changed = admin.put(f"/v1/project-mappings/{rule['id']}", json={**SEED[0], "priority": 50})
    assert changed.status_code == 200 and changed.json()["priority"] == 50
    assert changed.json()["created_at"] == rule["created_at"]

    for body, field in (
        ({**SEED[0], "field": "user"}, "field"),
        ({**SEED[0], "pattern": ""}, "pattern"),
        ({**SEED[0], "pattern": "x" * 257}, "pattern"),
        ({**SEED[0], "project": " "}, "project"),
        ({**SEED[0], "priority": 10**9}, "priority"),
        ({**SEED[0], "colour": "red"}, "colour"),
    ):
        r = admin.post("/v1/project-mappings", json=body)
        assert r.status_code == 422 and field in r.text, (body, r.text)

    assert admin.delete(f"/v1/project-mappings/{rule['id']}").status_code == 204
    assert admin.get(f"/v1/project-mappings/{rule['id']}").status_code == 404
    assert rule["id"] not in [r["id"] for r in admin.get("/v1/project-mappings").json()["project_mappings"]]


async def test_rules_reach_the_running_gateway_in_priority_order(api):
    admin, settings = api["admin"], api["settings"]
    for r in admin.get("/v1/project-mappings").json()["project_mappings"]:
        admin.delete(f"/v1/project-mappings/{r['id']}")
    async with gateway(settings) as client:
        rules_view = client.app.state.project_rules

        async def wait_for(label: str, agent: str, want: str | None) -> None:
            deadline = time.monotonic() + 10
            while rules_view.for_tenant(TENANT).project_for(agent, label) != want:
                assert time.monotonic() < deadline, (label, agent, want)
                await asyncio.sleep(0.05)

        ids = [(await asyncio.to_thread(admin.post, "/v1/project-mappings", json=body)).json()["id"] for body in SEED]
        await wait_for("peakpaws-safety-review", "default", "PeakPaws")
        await wait_for("something-else", "default", "General")  # a reload may fall between the posts
        rules = rules_view.for_tenant(TENANT)
        assert rules.project_for("default", "Kanban-Sync") == "Kanban Board"  # case-insensitive
        assert rules.project_for("default", "something-else") == "General"
        assert rules.project_for("default", None) == "General"  # the catch-all takes events without the field
        assert rules_view.for_tenant("another-tenant").project_for("default", "peakpaws-x") is None

        # a higher-priority agent rule wins over the label rules; changing it applies without restart
        agent_rule = await asyncio.to_thread(
            admin.post,
            "/v1/project-mappings",
            json={"pattern": "reviewer-?", "project": "Reviews", "priority": 20, "field": "agent"},
        )
        await wait_for("peakpaws-x", "reviewer-1", "Reviews")
        await asyncio.to_thread(
            admin.put,
            f"/v1/project-mappings/{agent_rule.json()['id']}",
            json={"pattern": "reviewer-?", "project": "Reviews", "priority": 5, "field": "agent"},
        )
        await wait_for("peakpaws-x", "reviewer-1", "PeakPaws")
        assert rules_view.for_tenant(TENANT).project_for("reviewer-1", "misc") == "Reviews"  # above the catch-all
        await asyncio.to_thread(admin.delete, f"/v1/project-mappings/{ids[2]}")  # no catch-all any more
        await wait_for("misc", "nobody", None)

        # the per-tenant limit (6 in this module): 3 live rules + 3 more, then 409
        for i in range(3):
            r = await asyncio.to_thread(
                admin.post, "/v1/project-mappings", json={"pattern": f"x{i}-*", "project": "X", "field": "agent"}
            )
            assert r.status_code == 201
        r = await asyncio.to_thread(admin.post, "/v1/project-mappings", json={"pattern": "y-*", "project": "Y"})
        assert r.status_code == 409 and r.json()["field"] == "pattern"


def test_session_fields_filter_and_break_down(api):
    settings, reader = api["settings"], api["reader"]
    end = datetime.now(UTC).replace(microsecond=0)
    events = make_events(TENANT, 30, end - timedelta(hours=2), end - timedelta(hours=1), seed=19, prefix="sess")
    kinds = ("main", "subagent", "heartbeat")
    for i, ev in enumerate(events):
        ev["session_type"], ev["session_label"] = kinds[i % 3], f"label-{i % 2}"
    columns = [*events[0]]
    client = get_client(settings)
    try:
        client.insert("usage_events", [[e[c] for c in columns] for e in events], column_names=columns)
    finally:
        client.close()
    window = {"from": (end - timedelta(hours=3)).isoformat(), "to": end.isoformat()}
    want = sum(e["cost_nanos"] for e in events if e["session_type"] == "subagent")
    overview = reader.get("/v1/analytics/overview", params={**window, "session_type": "subagent"})
    assert overview.status_code == 200, overview.text
    assert overview.json()["calls"] == 10
    breakdown = reader.get("/v1/analytics/breakdown", params={**window, "by": "session_type"})
    assert breakdown.status_code == 200, breakdown.text
    groups = {g["key"]: g for g in breakdown.json()["groups"]}
    assert set(groups) == set(kinds) and groups["subagent"]["calls"] == 10
    assert groups["subagent"]["cost_nanos"] == want
    assert overview.json()["cost_nanos"] == want
    labels = reader.get("/v1/analytics/breakdown", params={**window, "by": "session_label", "session_type": "main"})
    assert {g["key"]: g["calls"] for g in labels.json()["groups"]} == {"label-0": 5, "label-1": 5}
    raw = reader.get("/v1/analytics/events", params={**window, "session_type": "heartbeat", "limit": 100})
    assert raw.status_code == 200, raw.text
    rows = raw.json()["events"]
    assert len(rows) == 10 and {r["session_type"] for r in rows} == {"heartbeat"}
