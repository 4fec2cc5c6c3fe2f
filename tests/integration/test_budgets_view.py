"""The gateway's budget view: the current window follows the clock (its cache ends with the
window), and budget configs are re-read from ClickHouse only when they changed."""

from __future__ import annotations

import time
from datetime import datetime

import orjson
import pytest
from query_api_stack import migrate  # tests/integration on sys.path

from ingest_gateway.budget_view import BudgetView
from spendstream.budgets import Attribution, Budget, ScopeIndex, state_key
from spendstream.budgets.store import BudgetReader, insert_budget
from spendstream.clickhouse import get_client
from spendstream.settings import Settings


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def test_check_moves_to_the_next_calendar_window_at_local_midnight():
    view = BudgetView(Settings())
    daily = Budget("t1", "b1", "daily", {"project": "p"}, "daily", "Europe/Berlin", 10_000_000_000, enforce=True)
    view.index = ScopeIndex([daily])
    day1, day2 = ms("2026-03-28T00:00:00+01:00"), ms("2026-03-29T00:00:00+01:00")  # a DST night follows
    for start, spent in ((day1, 10_000_000_000), (day2, 1_500_000_000)):
        view.apply(state_key("b1", start), orjson.dumps({"window_start": start, "window_end": None,
                                                         "spent_nanos": spent}), day1)  # fmt: skip
    attr = Attribution(project="p")

    allowed, [standing] = view.check("t1", attr, 0, day2 - 1)
    assert (allowed, standing.window_start, standing.window_end, standing.spent) == (False, day1, day2, 10_000_000_000)
    allowed, [standing] = view.check("t1", attr, 0, day2)
    assert (allowed, standing.window_start, standing.spent) == (True, day2, 1_500_000_000)
    assert standing.window_end == ms("2026-03-30T00:00:00+02:00")  # 23 hours
    assert view.check("t1", attr, 8_500_000_001, day2)[0] is False
    assert view.check("t1", Attribution(project="other"), 0, day2) == (True, [])


@pytest.mark.clickhouse
def test_reader_reads_budgets_again_only_after_a_change(make_settings):
    settings = make_settings()
    migrate(settings)
    reader = BudgetReader(settings)
    client = get_client(settings)
    try:
        first = Budget("t1", "b1", "first", {"project": "p"}, "total", "UTC", 1_000_000_000)
        insert_budget(client, first, version=1)
        index = reader.read_if_changed()
        assert index is not None and list(index.budgets) == ["b1"]
        assert reader.read_if_changed() is None

        raised = Budget("t1", "b1", "first", {"project": "p"}, "total", "UTC", 2_000_000_000)
        insert_budget(client, raised, version=time.time_ns())
        index = reader.read_if_changed()
        assert index is not None and index.budgets["b1"].limit_nanos == 2_000_000_000
        assert reader.read_if_changed() is None
    finally:
        client.close()
        reader.close()
