"""Collectors' pure core against recorded-shape provider answers (tests/fixtures/provider_reports.json):
every figure is checked against the fixture's own numbers, money exactly in nano-USD."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from spendstream.collectors import anthropic, openai, windows
from spendstream.collectors.http import (
    HttpPolicy,
    ProviderHttpError,
    ReportClient,
    backoff_seconds,
    retry_after_seconds,
)
from spendstream.collectors.model import PageError

FIXTURES = json.loads((Path(__file__).parents[1] / "fixtures" / "provider_reports.json").read_text())
T0 = datetime(2025, 12, 6, tzinfo=UTC)


def test_openai_usage_page_keeps_input_including_cache_and_every_group():
    page = openai.parse_usage_page(FIXTURES["openai_usage"])
    assert page.has_more and page.next_page == "page_AAAAAGdGxdEiJdKOAAAAAGcqsYA="
    first, empty = page.buckets
    assert (first.start, first.end) == (T0, T0 + timedelta(hours=1))
    assert empty.rows == [] and empty.start == T0 + timedelta(hours=1)
    a, b = first.rows
    assert (a.model, a.project_id, a.api_key_id) == ("gpt-4o-2024-08-06", "proj_abc123", "key_9f8e7d")
    assert (a.input_tokens, a.cache_read_tokens, a.output_tokens, a.requests) == (12000, 8000, 3400, 42)
    assert (b.input_audio_tokens, b.output_audio_tokens, b.service_tier) == (400, 300, "")


def test_openai_costs_float_dollars_become_exact_nanos():
    page = openai.parse_costs_page(FIXTURES["openai_costs"])
    assert not page.has_more and page.next_page is None
    rows = page.buckets[0].rows
    assert [r.amount_nanos for r in rows] == [60_000_000, 1_234_567_891, 100_000_000]  # 1.2345678912 rounds
    assert [r.model for r in rows] == ["gpt-4o-2024-08-06", "gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"]
    assert rows[0].line_item == "gpt-4o-2024-08-06, input" and rows[2].project_id == "proj_def456"


def test_anthropic_usage_input_includes_cache_reads_and_both_cache_writes():
    page = anthropic.parse_usage_page(FIXTURES["anthropic_usage"])
    assert page.has_more and page.next_page
    a, b = page.buckets[0].rows
    # 1500 uncached + 200 read + 500 (5m) + 1000 (1h) writes
    assert (a.input_tokens, a.cache_read_tokens, a.cache_write_tokens, a.cache_write_1h_tokens) == (
        3200,
        200,
        1500,
        1000,
    )
    assert (a.output_tokens, a.web_search_requests, a.project_id) == (500, 10, "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ")
    assert (b.input_tokens, b.api_key_id, b.project_id, b.model) == (300, "", "", "claude-3-5-haiku-20241022")


def test_anthropic_cost_cents_string_becomes_exact_usd_nanos():
    page = anthropic.parse_costs_page(FIXTURES["anthropic_costs"])
    first, empty = page.buckets
    assert empty.rows == []
    a, b = first.rows
    assert a.amount_nanos == 1_237_891_200  # "123.78912" cents = $1.2378912
    assert b.amount_nanos == 1  # "0.0000001" cents = 1e-9 USD
    assert (a.model, a.token_type, a.cost_type, a.line_item) == (
        "claude-sonnet-4-20250514", "uncached_input_tokens", "tokens", "Claude Sonnet 4 Usage - Input Tokens"
    )  # fmt: skip


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda p: p["data"][0]["results"][0].update(amount=12.5), "amount"),
        (lambda p: p["data"][0]["results"][0].update(amount="1e99999"), "amount"),
        (lambda p: p["data"][0]["results"][0].update(amount="NaN"), "amount"),
        (lambda p: p["data"][0].update(starting_at="yesterday"), "starting_at"),
        (lambda p: p.update(has_more=True, next_page=None), "next_page"),
        (lambda p: p["data"][0]["results"][0].update(currency="EUR"), "currency"),
    ],
)
def test_a_page_breaking_the_shape_names_the_part(mutate, where):
    page = json.loads(json.dumps(FIXTURES["anthropic_costs"]))
    mutate(page)
    with pytest.raises(PageError) as err:
        anthropic.parse_costs_page(page)
    assert where in err.value.where


def test_token_counts_must_be_bounded_integers():
    page = json.loads(json.dumps(FIXTURES["openai_usage"]))
    page["data"][0]["results"][0]["input_tokens"] = -1
    with pytest.raises(PageError, match="input_tokens"):
        openai.parse_usage_page(page)
    page["data"][0]["results"][0]["input_tokens"] = 1.5
    with pytest.raises(PageError, match="input_tokens"):
        openai.parse_usage_page(page)


def test_requests_carry_the_documented_parameters():
    end = T0 + timedelta(days=1)
    assert ("start_time", str(int(T0.timestamp()))) in openai.usage_params(T0, end)
    assert [v for k, v in openai.usage_params(T0, end) if k == "group_by[]"] == ["model", "project_id", "api_key_id"]
    assert ("bucket_width", "1d") in openai.costs_params(T0, end)
    assert ("starting_at", "2025-12-06T00:00:00Z") in anthropic.usage_params(T0, end)
    assert ("limit", "31") in anthropic.costs_params(T0, end)
    assert anthropic.headers("k")["x-api-key"] == "k" and anthropic.headers("k")["anthropic-version"]
    assert openai.headers("k") == {"Authorization": "Bearer k"}


# ---------------------------------------------------------------- windows and watermarks


def test_first_run_starts_backfill_days_back_aligned_to_buckets():
    now = datetime(2025, 12, 6, 10, 37, tzinfo=UTC)
    w = windows.plan(now, None, 30, 3600)
    assert w.start == datetime(2025, 11, 6, 10, tzinfo=UTC)
    assert w.end == datetime(2025, 12, 6, 11, tzinfo=UTC)  # the current partial hour included
    assert w.watermark == datetime(2025, 12, 6, 10, tzinfo=UTC)
    daily = windows.plan(now, None, 30, 86400)
    assert (daily.start, daily.end) == (datetime(2025, 11, 6, tzinfo=UTC), datetime(2025, 12, 7, tzinfo=UTC))


def test_every_run_recollects_the_last_48_hours_and_a_late_one_catches_up():
    now = datetime(2025, 12, 6, 10, 37, tzinfo=UTC)
    recent = windows.plan(now, datetime(2025, 12, 6, 9, tzinfo=UTC), 30, 3600)
    assert recent.start == datetime(2025, 12, 4, 10, tzinfo=UTC)
    stale = windows.plan(now, datetime(2025, 12, 1, 3, tzinfo=UTC), 30, 3600)
    assert stale.start == datetime(2025, 12, 1, 3, tzinfo=UTC)


def test_backfill_is_bounded_to_90_days():
    now = datetime(2025, 12, 6, tzinfo=UTC)
    assert windows.backfill(now, 90, 86400).buckets(86400) == 90
    for days in (0, 91):
        with pytest.raises(ValueError):
            windows.backfill(now, days, 3600)


# ---------------------------------------------------------------- HTTP: retries and pagination


def test_retry_after_forms():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = datetime(2025, 12, 6, tzinfo=UTC)
    assert retry_after_seconds("Sat, 06 Dec 2025 00:00:30 GMT", now) == 30.0


def test_backoff_is_full_jitter_capped():
    policy = HttpPolicy(backoff_base_s=1, backoff_max_s=10)
    assert backoff_seconds(0, policy, lambda: 0.999) < 1
    assert backoff_seconds(10, policy, lambda: 1.0) == 10
    assert backoff_seconds(3, policy, lambda: 0.5) == 4


def test_429_with_retry_after_is_waited_then_pages_followed():
    answers = [
        httpx.Response(429, headers={"retry-after": "3"}, json={"error": {"type": "rate_limit_error"}}),
        httpx.Response(200, json={"data": [], "has_more": True, "next_page": "p2"}),
        httpx.Response(503),
        httpx.Response(200, json={"data": [], "has_more": False, "next_page": None}),
    ]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    slept = []
    client = ReportClient("https://x.test/v1", {"x-api-key": "secret"}, "secret", HttpPolicy(),
                          sleep=slept.append, transport=httpx.MockTransport(handler))  # fmt: skip
    pages = list(client.pages("/r", [("a", "1")], anthropic.parse_usage_page))
    assert len(pages) == 2 and slept[0] == 3.0 and len(slept) == 2 and client.retries == 2
    assert seen[2].url.params.get("page") == "p2" and seen[0].url.params.get("page") is None


def test_client_errors_fail_at_once_and_never_echo_the_key():
    client = ReportClient(
        "https://x.test", {"Authorization": "Bearer sk-admin-SECRET"}, "sk-admin-SECRET", HttpPolicy(),
        sleep=lambda s: None,
        transport=httpx.MockTransport(lambda r: httpx.Response(401, text="bad key sk-admin-SECRET")),
    )  # fmt: skip
    with pytest.raises(ProviderHttpError) as err:
        client.get_json("/r", [])
    assert err.value.status == 401 and "SECRET" not in str(err.value) and client.retries == 0


def test_retries_are_bounded_and_oversized_answers_refused():
    calls = []
    client = ReportClient("https://x.test", {}, "k", HttpPolicy(max_attempts=3), sleep=lambda s: None,
                          transport=httpx.MockTransport(lambda r: calls.append(1) or httpx.Response(500)))  # fmt: skip
    with pytest.raises(ProviderHttpError, match="after 3 attempts"):
        client.get_json("/r", [])
    assert len(calls) == 3
    big = ReportClient("https://x.test", {}, "k", HttpPolicy(max_response_bytes=100), sleep=lambda s: None,
                       transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"[" + b"0," * 100 + b"0]")))  # fmt: skip
    with pytest.raises(ProviderHttpError, match="exceeds"):
        big.get_json("/r", [])


# ---------------------------------------------------------------- reconciliation alert (pure)


def test_drift_alert_needs_both_thresholds_and_reads_as_a_contract_alert():
    from decimal import Decimal

    from spendstream.alerting.payloads import detail_lines, generic_body, parse_alert, summary
    from spendstream.collectors.alerts import alert_id, drift_alerts
    from spendstream.collectors.connections import OpenConnection
    from spendstream.collectors.reconcile import Side, merge

    conn = OpenConnection("t", "pc_1", "openai", "prod", "k", 30, Decimal("5"), 1_000_000_000, ("wh_1",))
    d1, d2, d3 = (datetime(2025, 12, n, tzinfo=UTC).date() for n in (1, 2, 3))
    days = merge(
        "model",
        {(d1, "openai", "m"): Side(100 * 10**9), (d2, "openai", "m"): Side(10 * 10**9), (d3, "openai", "m"): Side(10)},
        {(d1, "openai", "m"): 104 * 10**9, (d2, "openai", "m"): 12 * 10**9, (d3, "openai", "m"): 20},
        {},
    )["days"]
    # d1: $4 but 3.85 % (under 5 %); d2: $2 and 16.67 %; d3: 50 % but 10 nano-USD (under $1)
    alerts = drift_alerts(conn, days, datetime(2025, 12, 6, tzinfo=UTC))
    assert [a["date"] for a in alerts] == ["2025-12-02"]
    alert = parse_alert(alerts[0])
    assert alert.kind == "reconciliation" and alert.channels == ("wh_1",)
    assert alert.alert_id == alert_id("pc_1", "2025-12-02") == alerts[0]["alert_id"]
    assert generic_body(alert)["difference_usd"] == "2" and generic_body(alert)["drift_pct"] == "16.67"
    assert "reported 12.00 USD on 2025-12-02" in summary(alert) and "drift 16.67%" in summary(alert)
    assert any("Difference: 2.00 USD" in line for line in detail_lines(alert))


def test_a_repeated_cursor_stops_the_paging():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [], "has_more": True, "next_page": "same"})

    client = ReportClient("https://x.test", {}, "k", HttpPolicy(), transport=httpx.MockTransport(handler))
    with pytest.raises(ProviderHttpError, match="repeats"):
        list(client.pages("/r", [], anthropic.parse_usage_page))
