"""The pure re-pricing planner: new price with the pricing core, correction rows, the diff."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from spendstream.contracts import COST_CLASSES, TOKEN_FIELDS
from spendstream.pricing import OverrideBook, default_catalog, price
from spendstream.repricing.planner import (
    COST_COLUMNS,
    REPRICED,
    REVERSAL,
    ROW_COLUMNS,
    Diff,
    Scope,
    StoredEvent,
    reprice,
)

AT = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def catalog():
    return default_catalog()


@pytest.fixture(scope="module")
def overrides(catalog):
    rows = [{"id": "ov1", "tenant": "t", "provider": "acme", "model": "mystery-1",
             "effective_from": "2026-03-02T00:00:00Z", "input_mtok": "2", "output_mtok": "8"}]  # fmt: skip
    return OverrideBook.from_rows(rows, catalog).for_tenant("t")


def stored(model="mystery-1", provider="acme", at=AT, cost=None, status="unknown_model", source="none", event_id="e1"):
    cost = cost or dict.fromkeys(COST_CLASSES, 0)
    attribution = {c: "" for c in ("tenant", "project", "agent", "user", "session_id", "operation", "status")}
    attribution |= {"tenant": "t", "provider": provider, "model": model, "event_id": event_id, "timestamp": at,
                    "received_at": at, "tags": {"team": "a"}, "partition": 0, "offset": 3, "src_partition": 1,
                    "src_offset": 9}  # fmt: skip
    tokens = dict.fromkeys(TOKEN_FIELDS, 0) | {"input_tokens": 1000, "output_tokens": 200}
    return StoredEvent(attribution, tokens, cost, sum(cost.values()), "", status, source)


def test_an_unknown_event_gets_the_override_effective_at_its_time(catalog, overrides) -> None:
    new = reprice(stored(), catalog, overrides)
    assert new is not None and new.pricing_status == "priced" and new.price_source == "override"
    # 1000 x 2 USD/M + 200 x 8 USD/M = 0.0036 USD
    assert new.cost_nanos == 3_600_000
    # the same as the pricing stage's core on the same event
    event = {"provider": "acme", "model": "mystery-1", "timestamp": "2026-03-02T12:00:00.000Z",
             "input_tokens": 1000, "output_tokens": 200}  # fmt: skip
    assert new == price(event, catalog, overrides)
    # before the override's start: still unknown, nothing to correct
    assert reprice(stored(at=datetime(2026, 3, 1, 23, tzinfo=UTC)), catalog, overrides) is None


def test_an_event_priced_as_it_would_be_now_and_client_prices_are_left_alone(catalog, overrides) -> None:
    line = reprice(stored(), catalog, overrides)
    current = stored(cost=line.cost, status="priced", source="override")
    current = StoredEvent(current.attribution, current.tokens, current.cost, current.cost_nanos, line.price_id,
                          "priced", "override")  # fmt: skip
    assert reprice(current, catalog, overrides) is None
    client = stored(cost={**dict.fromkeys(COST_CLASSES, 0), "request": 5}, status="client", source="client")
    assert reprice(client, catalog, overrides) is None


def test_correction_rows_take_back_the_current_state_and_add_the_new_one(catalog, overrides) -> None:
    old_cost = {**dict.fromkeys(COST_CLASSES, 0), "input": 7, "output": 3}
    event = stored(cost=old_cost, status="priced", source="catalog")
    diff = Diff(sample_size=1)
    rows = diff.plan([event, stored(event_id="e2")], catalog, overrides, job_id="rp1")
    assert [r["correction_kind"] for r in rows] == [REVERSAL, REPRICED, REVERSAL, REPRICED]
    reversal, repriced = rows[:2]
    assert set(reversal) == set(ROW_COLUMNS)
    assert reversal["cost_nanos"] == -10 and reversal[COST_COLUMNS["input"]] == -7
    assert (reversal["pricing_status"], reversal["price_source"]) == ("priced", "catalog")
    assert repriced["cost_nanos"] == 3_600_000 and repriced["price_source"] == "override"
    for row in rows:  # no tokens, no latency, the event's own coordinates and attribution
        assert all(row[t] == 0 for t in TOKEN_FIELDS) and row["latency_ms"] is None
        assert (row["src_partition"], row["src_offset"], row["tags"]) == (1, 9, {"team": "a"})
        assert row["correction_id"] == "rp1"
    out = diff.to_json()
    assert (out["events_scanned"], out["events_changed"], out["old_nanos"], out["new_nanos"]) == (2, 2, 10, 7_200_000)
    assert out["by_day"] == [{"day": "2026-03-02", "events": 2, "old_nanos": 10, "new_nanos": 7_200_000,
                              "delta_nanos": 7_199_990}]  # fmt: skip
    assert len(out["sample"]) == 1
    assert Diff.from_json(out, sample_size=1).to_json() == out


def test_an_event_the_job_corrected_before_a_crash_is_counted_not_written(catalog, overrides) -> None:
    line = reprice(stored(), catalog, overrides)
    done = StoredEvent(stored().attribution, stored().tokens, line.cost, line.cost_nanos, line.price_id, "priced",
                       "override", before_job=0)  # fmt: skip
    diff = Diff()
    assert diff.plan([done], catalog, overrides, job_id="rp1") == []
    assert (diff.events_changed, diff.old_nanos, diff.new_nanos) == (1, 0, 3_600_000)


def test_a_scope_needs_an_end_after_its_start_and_round_trips() -> None:
    with pytest.raises(ValueError, match="after"):
        Scope("t", AT, AT)
    scope = Scope("t", AT, datetime(2026, 3, 3, tzinfo=UTC), model="m")
    assert scope.describe() == {"from": "2026-03-02T12:00:00.000Z", "to": "2026-03-03T00:00:00.000Z", "model": "m"}
    assert Scope.from_description("t", scope.describe()) == scope
