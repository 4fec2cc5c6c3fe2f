"""Which budgets an event counts for: scope matching and the scope index. Pure: no IO.

A budget's scope matches an attribution (an event's, or a budget check's) when each of its set
fields equals the attribution's (``tag`` = ``key=value``: the attribution carries that tag with
that value).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from spendstream.budgets.model import Budget

#: index lookups go from the field that usually has the most distinct values to the least, so a
#: budget is filed under the field that narrows candidates most
INDEX_ORDER = ("user", "agent", "model", "tag", "project", "provider")


@dataclass(frozen=True, slots=True)
class Attribution:
    """What a budget scope can be matched against: one event's attribution, or a check request's."""

    project: str = ""
    agent: str = ""
    user: str = ""
    provider: str = ""
    model: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)

    def value(self, scope_field: str) -> str:
        return getattr(self, scope_field)

    @classmethod
    def of_event(cls, event: Mapping[str, Any]) -> Attribution:
        return cls(
            event.get("project", ""), event.get("agent", ""), event.get("user", ""),
            event.get("provider", ""), event.get("model", ""), event.get("tags") or {},
        )  # fmt: skip


def scope_matches(scope: Mapping[str, str], attr: Attribution) -> bool:
    for key, want in scope.items():
        if key == "tag":
            tag_key, _, tag_value = want.partition("=")
            if attr.tags.get(tag_key) != tag_value:
                return False
        elif attr.value(key) != want:
            return False
    return True


class ScopeIndex:
    """Budgets by (tenant, index field, value): an event looks up a handful of keys instead of
    scanning the tenant's budgets. Each budget is filed once, under its most selective set field
    (INDEX_ORDER); tenant-wide budgets (empty scope) are filed per tenant."""

    def __init__(self, budgets: Iterable[Budget] = ()):
        self.budgets: dict[str, Budget] = {}
        self._by_key: dict[tuple[str, str, str], list[Budget]] = {}
        self._tenant_wide: dict[str, list[Budget]] = {}
        #: tag keys some budget of the tenant filters on (events may carry 32 tags; look up only these)
        self._tag_keys: dict[str, set[str]] = {}
        for budget in budgets:
            self.budgets[budget.id] = budget
            indexed = next((f for f in INDEX_ORDER if f in budget.scope), None)
            if indexed is None:
                self._tenant_wide.setdefault(budget.tenant, []).append(budget)
                continue
            self._by_key.setdefault((budget.tenant, indexed, budget.scope[indexed]), []).append(budget)
            if indexed == "tag":
                self._tag_keys.setdefault(budget.tenant, set()).add(budget.scope["tag"].partition("=")[0])
        self._tenants = {b.tenant for b in self.budgets.values()}
        fields: dict[str, set[str]] = {}
        for budget in self.budgets.values():
            fields.setdefault(budget.tenant, set()).update(f for f in budget.scope if f != "tag")
        self._match_fields = {
            tenant: (tuple(sorted(fields.get(tenant, ()))), tuple(sorted(self._tag_keys.get(tenant, ()))))
            for tenant in self._tenants
        }

    def __len__(self) -> int:
        return len(self.budgets)

    def has_tenant(self, tenant: str) -> bool:
        return tenant in self._tenants

    def match_fields(self, tenant: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(attribution fields, tag keys) that some budget of ``tenant`` filters on: only these
        decide which of its budgets an event matches."""
        return self._match_fields.get(tenant, ((), ()))

    def candidates(self, tenant: str, attr: Attribution) -> Iterator[Budget]:
        yield from self._tenant_wide.get(tenant, ())
        by_key = self._by_key
        for name in INDEX_ORDER:
            if name == "tag":
                for tag_key in self._tag_keys.get(tenant, ()):
                    if tag_key in attr.tags:
                        yield from by_key.get((tenant, "tag", f"{tag_key}={attr.tags[tag_key]}"), ())
            else:
                value = attr.value(name)
                if value:
                    yield from by_key.get((tenant, name, value), ())

    def match(self, tenant: str, attr: Attribution) -> list[Budget]:
        return [b for b in self.candidates(tenant, attr) if scope_matches(b.scope, attr)]
