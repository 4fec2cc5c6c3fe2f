"""Project mapping rules: which project an event without one belongs to.

A rule ``{"pattern": "peakpaws-*", "project": "PeakPaws", "priority": 10, "field": "session_label"}``
assigns ``project`` to events that arrive without one (event API, OTLP, proxy) when the event's
``field`` (``session_label`` or ``agent``) matches the glob ``pattern`` (``*``, ``?``, ``[abc]``;
case-insensitive). Rules are tried highest ``priority`` first (ties: the older rule first); the
first match wins. A rule with pattern ``*`` matches every event, also one without the field, so
it is the tenant's catch-all fallback. With no match the event keeps no project: the event API
then refuses it naming ``project``, the OTLP route uses ``otel.default_project``.

Rules live in the ClickHouse table ``project_mappings`` (written by the query API's
``/v1/project-mappings``, ReplacingMergeTree like the other config tables). The gateway keeps every
tenant's rules compiled in memory (:class:`RuleSet`) and re-reads them every
``otel.project_mappings_reload_s``, so a change is live there within that period, without a restart.

The matching (:class:`Rule`, :class:`RuleSet`) is pure; the row functions take a clickhouse-connect
client and do no IO of their own.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

TABLE = "project_mappings"
FIELDS = ("session_label", "agent")
MAX_PATTERN_LEN = 256
MAX_PRIORITY = 1_000_000
COLUMNS = ("tenant", "id", "pattern", "project", "priority", "field", "created_at", "updated_at", "deleted", "version")


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    pattern: str
    project: str
    priority: int
    field: str
    created_ms: int = 0

    def compiled(self) -> re.Pattern[str]:
        return re.compile(fnmatch.translate(self.pattern.lower()), re.DOTALL)


class RuleSet:
    """One tenant's rules, compiled and in match order."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[Rule]):
        ordered = sorted(rules, key=lambda r: (-r.priority, r.created_ms, r.id))
        self._rules = [(rule.field, rule.compiled().match, rule.project) for rule in ordered]

    def __len__(self) -> int:
        return len(self._rules)

    def project_for(self, agent: str | None, session_label: str | None) -> str | None:
        """The project of the first matching rule, or None."""
        values = {"agent": (agent or "").lower(), "session_label": (session_label or "").lower()}
        for field, match, project in self._rules:
            if match(values[field]):
                return project
        return None


EMPTY = RuleSet(())


def by_tenant(rows: Iterable[tuple[str, Rule]]) -> dict[str, RuleSet]:
    grouped: dict[str, list[Rule]] = {}
    for tenant, rule in rows:
        grouped.setdefault(tenant, []).append(rule)
    return {tenant: RuleSet(rules) for tenant, rules in grouped.items()}


def rule_from_row(row: dict[str, Any]) -> Rule:
    created = row["created_at"]
    return Rule(
        id=row["id"],
        pattern=row["pattern"],
        project=row["project"],
        priority=int(row["priority"]),
        field=row["field"],
        created_ms=int(created.timestamp() * 1000) if created is not None else 0,
    )


LIVE_SQL = f"SELECT {', '.join(COLUMNS[:8])} FROM {TABLE} FINAL WHERE deleted = 0"


def load_all(client: Any) -> dict[str, RuleSet]:
    """Every tenant's live rules (sync clickhouse-connect client; the gateway runs it in a thread)."""
    rows = client.query(LIVE_SQL).named_results()
    return by_tenant((row["tenant"], rule_from_row(row)) for row in rows)
