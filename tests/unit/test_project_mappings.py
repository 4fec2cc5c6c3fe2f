"""Project mapping rules (spendstream/project_mappings.py): glob matching, priority order, ties,
the catch-all fallback, the two fields; and the event API's use of them (ingest_gateway/logic.py)."""

from __future__ import annotations

from ingest_gateway import logic
from spendstream.project_mappings import Rule, RuleSet, by_tenant

SEED = [
    Rule("r1", "peakpaws-*", "PeakPaws", 10, "session_label", created_ms=1),
    Rule("r2", "kanban-*", "Kanban Board", 10, "session_label", created_ms=2),
    Rule("r3", "*", "General", 0, "session_label", created_ms=3),
]


def test_seed_examples():
    rules = RuleSet(SEED)
    assert rules.project_for("default", "peakpaws-safety-review") == "PeakPaws"
    assert rules.project_for("default", "kanban-sync") == "Kanban Board"
    assert rules.project_for("default", "standup") == "General"
    assert rules.project_for("default", None) == "General"  # the catch-all also takes events without a label


def test_highest_priority_first_then_the_older_rule():
    rules = RuleSet([
        Rule("low", "peak*", "Low", 1, "session_label", created_ms=1),
        Rule("high", "peakpaws-?afety*", "High", 5, "session_label", created_ms=9),
        Rule("old", "peakpaws-*", "Old", 5, "session_label", created_ms=2),
    ])  # fmt: skip
    assert rules.project_for("a", "peakpaws-safety") == "Old"  # same priority: created first wins
    assert rules.project_for("a", "peakzzz") == "Low"
    assert rules.project_for("a", "other") is None  # no catch-all: no project


def test_agent_field_case_insensitive_and_character_classes():
    rules = RuleSet([
        Rule("a", "Reviewer-[0-9]", "Reviews", 20, "agent"),
        *SEED,
    ])  # fmt: skip
    assert rules.project_for("REVIEWER-7", "peakpaws-x") == "Reviews"
    assert rules.project_for("reviewer-x", "peakpaws-x") == "PeakPaws"
    assert rules.project_for("reviewer-1\nx", "z") == "General"  # the whole value must match


def test_rules_are_per_tenant():
    tenants = by_tenant([("t1", SEED[0]), ("t2", SEED[1])])
    assert tenants["t1"].project_for("a", "kanban-x") is None
    assert tenants["t2"].project_for("a", "kanban-x") == "Kanban Board"


def test_event_api_applies_the_rules_to_events_without_a_project():
    ctx = logic.RequestContext.now(RuleSet(SEED[:2]))
    body = b"""[
        {"model": "gpt-4o", "provider": "openai", "session_label": "peakpaws-a", "session_type": "main"},
        {"model": "gpt-4o", "provider": "openai", "session_label": "kanban-b", "project": "Explicit"},
        {"model": "gpt-4o", "provider": "openai", "session_label": "nothing"}
    ]"""
    result = logic.validate_body(body, False, 10, ctx)
    assert sorted(result.by_project) == ["Explicit", "PeakPaws"]
    assert result.by_project["PeakPaws"][0].session_type == "main"
    (rejected,) = result.rejected
    assert rejected["index"] == 2 and rejected["errors"][0]["field"] == "project"
    assert "no project mapping rule matched" in rejected["errors"][0]["message"]
