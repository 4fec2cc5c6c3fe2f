"""Validation and normalisation of events and bodies (pure; no HTTP, no broker)."""

from __future__ import annotations

import gzip
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest_gateway.errors import BodyError
from ingest_gateway.logic import (
    EVENT_FIELDS,
    RequestContext,
    decode_content,
    normalise_names,
    uuid7,
    validate_body,
    validate_event,
)
from ingest_gateway.publisher import encode_events, encode_records
from spendstream.contracts import TOKEN_FIELDS, TOKEN_PARENTS, record_key
from spendstream.timeutil import format_timestamp

REPO_ROOT = Path(__file__).resolve().parents[2]

NOW = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
CTX = RequestContext(int(NOW.timestamp() * 1e9))
BASE = {"project": "bot", "provider": "openai", "model": "gpt-4o", "input_tokens": 100, "output_tokens": 20}


def ok(event: dict) -> dict:
    normalised, errors = validate_event(event, CTX)
    assert errors == [], errors
    assert normalised is not None
    return normalised


def rejected(event: object) -> list[dict]:
    normalised, errors = validate_event(event, CTX)
    assert normalised is None
    assert errors
    return errors


def test_defaults_and_generated_id():
    ev = ok(BASE)
    assert ev["agent"] == "default" and ev["status"] == "ok"
    assert ev["timestamp"] == "2025-06-01T12:00:00.123Z" == CTX.received_at_str
    parsed = uuid.UUID(ev["event_id"])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert int(parsed.hex[:12], 16) == CTX.received_ms  # the id sorts by receive time
    assert "cache_read_tokens" not in ev  # zero subsets are left out of the wire format


def test_receive_time_is_utc_now():
    parsed = datetime.fromisoformat(RequestContext.now().received_at_str)
    assert parsed.tzinfo == UTC
    assert abs((parsed - datetime.now(UTC)).total_seconds()) < 2


def test_uuid7_is_unique_and_time_ordered():
    ids = [uuid7(1_700_000_000_000 + i) for i in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)


@pytest.mark.parametrize(
    ("provider", "model", "expected"),
    [
        (None, "openai/gpt-4o", ("openai", "gpt-4o")),
        (None, " OpenAI/GPT-4o ", ("openai", "gpt-4o")),
        ("OpenAI", "openai/gpt-4o", ("openai", "gpt-4o")),
        ("openrouter", "anthropic/claude-3.5-sonnet", ("openrouter", "anthropic/claude-3.5-sonnet")),
        (
            "bedrock",
            "anthropic.claude-3-5-sonnet-20240620-v1:0",
            ("bedrock", "anthropic.claude-3-5-sonnet-20240620-v1:0"),
        ),
        (None, "gpt-4o", (None, "gpt-4o")),
        # the catalog knows these only by their full id: the split keeps the provider, not the model
        ("perplexity", "perplexity/glm-5.3-flash", ("perplexity", "perplexity/glm-5.3-flash")),
        (None, "Together/Tev1-4B-experimental", ("together", "together/tev1-4b-experimental")),
    ],
)
def test_names_are_normalised_minimally(provider, model, expected):
    assert normalise_names(provider, model) == expected


def test_timestamps_become_utc_milliseconds():
    assert ok({**BASE, "timestamp": "2025-06-01T14:00:00.5+02:00"})["timestamp"] == "2025-06-01T12:00:00.500Z"
    assert ok({**BASE, "timestamp": "2025-06-01T11:00:00.123456Z"})["timestamp"] == "2025-06-01T11:00:00.123Z"
    assert ok({**BASE, "timestamp": "2016-02-29T00:00:00Z"})["timestamp"] == "2016-02-29T00:00:00.000Z"  # backfill
    soon = format_timestamp(NOW + timedelta(minutes=4))
    assert ok({**BASE, "timestamp": soon})["timestamp"] == soon


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (format_timestamp(NOW + timedelta(minutes=5, seconds=1)), "future"),
        ("2025-06-01T12:00:00", "UTC offset"),
        ("yesterday", "RFC 3339"),
        ("1969-12-31T23:59:59Z", "1970"),
        (1717243200, "Expected `str`"),
    ],
)
def test_bad_timestamps_are_rejected(value, fragment):
    errors = rejected({**BASE, "timestamp": value})
    assert errors[0]["field"] == "timestamp"
    assert fragment in errors[0]["message"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.0100", "0.01"), (0.1, "0.1"), (3, "3"), ("0", "0"), ("1E+2", "100"), ("0.000000001", "0.000000001")],
)
def test_client_cost_is_kept_as_exact_decimal_string(value, expected):
    assert ok({**BASE, "cost_usd": value})["cost_usd"] == expected


@pytest.mark.parametrize("value", ["abc", "-1", "NaN", "Infinity", "2000000", -0.5, True, [1]])
def test_bad_costs_are_rejected(value):
    assert rejected({**BASE, "cost_usd": value})[0]["field"] == "cost_usd"


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"project": None}, "project", "required"),
        ({"model": None}, "model", "required"),
        ({"project": "   "}, "project", "blank"),
        ({"project": "p" * 129}, "project", "length <= 128"),
        ({"agent": ""}, "agent", "length >= 1"),
        ({"user": "u" * 257}, "user", "length <= 256"),
        ({"provider": None, "model": "gpt-4o"}, "provider", "required"),
        ({"provider": " "}, "provider", "blank"),
        ({"input_tokens": -1}, "input_tokens", ">= 0"),
        ({"input_tokens": 1.0}, "input_tokens", "Expected `int`"),
        ({"output_tokens": True}, "output_tokens", "Expected `int`"),
        ({"output_tokens": "20"}, "output_tokens", "Expected `int`"),
        ({"input_tokens": 10**13}, "input_tokens", "<="),
        ({"tags": {"k": 1}}, "tags", "Expected `str`"),
        ({"tags": {f"k{i}": "v" for i in range(33)}}, "tags", "length <= 32"),
        ({"tags": {"k" * 129: "v"}}, "tags", "key"),
        ({"status": "fine"}, "status", "Invalid enum value"),
        ({"latency_ms": -5}, "latency_ms", ">= 0"),
        ({"event_id": ""}, "event_id", "length >= 1"),
        ({"event_id": "e" * 129}, "event_id", "length <= 128"),
        ({"usage": {"prompt_tokens": 5}}, "usage", "not both"),
        ({"input_tokens": None, "output_tokens": None, "usage": [1]}, "usage", "Expected `object`"),
    ],
)
def test_each_rejection_names_its_field(change, field, fragment):
    event = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    errors = rejected(event)
    assert errors[0]["field"] == field, errors
    assert fragment in errors[0]["message"], errors


@pytest.mark.parametrize(("subset", "parent"), sorted(TOKEN_PARENTS.items()))
def test_a_subset_larger_than_its_parent_is_rejected(subset, parent):
    event = {**BASE, "input_tokens": 10, "output_tokens": 10, "cache_write_tokens": 5, subset: 11}
    if parent == "cache_write_tokens":
        event[subset] = 6
    errors = rejected(event)
    assert any(e["field"] == subset and parent in e["message"] for e in errors), errors


@pytest.mark.parametrize(
    "parts",
    [{"cache_read_tokens": 60, "cache_write_tokens": 50}, {"cache_read_tokens": 60, "input_audio_tokens": 41}],
)
def test_the_parts_of_input_must_fit_in_it_together(parts):
    errors = rejected({**BASE, "input_tokens": 100, **parts})
    assert errors == [{"field": "input_tokens", "message": errors[0]["message"]}]
    assert "must include them" in errors[0]["message"]


def test_unknown_fields_are_all_named_with_hints():
    errors = rejected({**BASE, "inptu_tokens": 1, "colour": "red"})
    assert [e["field"] for e in errors] == ["colour", "inptu_tokens"]
    assert "did you mean 'input_tokens'" in errors[1]["message"]


def test_non_objects_are_rejected_as_events():
    assert rejected(5)[0]["field"] == "event"
    assert rejected([BASE])[0]["field"] == "event"


def test_provider_usage_becomes_token_fields():
    ev = ok({"project": "p", "model": "anthropic/claude-sonnet-4-5",
             "usage": {"input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 7}})  # fmt: skip
    assert (ev["provider"], ev["model"]) == ("anthropic", "claude-sonnet-4-5")
    assert ev["input_tokens"] == 105 and ev["cache_read_tokens"] == 100 and ev["output_tokens"] == 7
    assert "usage" not in ev


# ------------------------------------------------------------------ bodies


def test_array_partial_acceptance_groups_by_project():
    body = orjson.dumps([BASE, {**BASE, "project": "other"}, {**BASE, "input_tokens": -1, "event_id": "bad-1"}, BASE])
    result = validate_body(body, False, 10, CTX)
    assert result.accepted == 3
    assert sorted((p, len(evs)) for p, evs in result.by_project.items()) == [("bot", 2), ("other", 1)]
    assert result.rejected == [
        {"index": 2, "event_id": "bad-1", "errors": [{"field": "input_tokens", "message": "Expected `int` >= 0"}]}
    ]
    bot, other = result.by_project["bot"], result.by_project["other"]
    assert result.event_ids == [bot[0].event_id, other[0].event_id, bot[1].event_id]  # request order


def test_ndjson_with_blank_lines_and_crlf():
    body = b"\r\n".join(orjson.dumps({**BASE, "event_id": f"e{i}"}) for i in range(3)) + b"\r\n\r\n"
    result = validate_body(body, True, 10, CTX)
    assert result.event_ids == ["e0", "e1", "e2"]


def test_ndjson_malformed_line_is_named():
    body = orjson.dumps(BASE) + b"\n" + orjson.dumps(BASE) + b'\n{"project": "p",, }\n'
    with pytest.raises(BodyError) as info:
        validate_body(body, True, 10, CTX)
    assert info.value.status == 400 and "line 3, column 17" in info.value.message


def test_malformed_json_names_line_and_column():
    body = b'[\n  {"project": "p"},\n  {"project": tru}\n]'
    with pytest.raises(BodyError) as info:
        validate_body(body, False, 10, CTX)
    assert info.value.status == 400 and info.value.code == "malformed_json"
    assert re.search(r"line 3, column \d+", info.value.message), info.value.message


def test_syntax_error_after_an_invalid_event_is_still_malformed():
    with pytest.raises(BodyError) as info:
        validate_body(b'[{"project": 5}, {"project": }]', False, 10, CTX)
    assert info.value.code == "malformed_json"


@pytest.mark.parametrize("body", [b"", b"  ", b"[]", b"\n\n"])
def test_empty_bodies_are_400(body):
    with pytest.raises(BodyError) as info:
        validate_body(body, body.startswith(b"\n"), 10, CTX)
    assert (info.value.status, info.value.code) == (400, "no_events")


@pytest.mark.parametrize("body", [b"5", b'"event"', b"null"])
def test_scalar_bodies_are_400(body):
    with pytest.raises(BodyError) as info:
        validate_body(body, False, 10, CTX)
    assert info.value.code == "bad_body"


@pytest.mark.parametrize("ndjson", [False, True])
def test_too_many_events_is_413(ndjson):
    events = [BASE] * 11
    body = b"\n".join(map(orjson.dumps, events)) if ndjson else orjson.dumps(events)
    with pytest.raises(BodyError) as info:
        validate_body(body, ndjson, 10, CTX)
    assert info.value.status == 413
    invalid = orjson.dumps([{**BASE, "input_tokens": -1}] * 11)  # counted on the slow path too
    with pytest.raises(BodyError):
        validate_body(invalid, False, 10, CTX)


def test_gzip_is_inflated_within_the_limit():
    raw = orjson.dumps([BASE] * 50)
    assert decode_content(gzip.compress(raw), "gzip", len(raw)) == raw
    with pytest.raises(BodyError) as info:
        decode_content(gzip.compress(b" " * 10_000), "gzip", 5_000)  # a tiny bomb
    assert info.value.status == 413
    with pytest.raises(BodyError) as info:
        decode_content(b"not gzip", "gzip", 5_000)
    assert info.value.status == 400
    with pytest.raises(BodyError) as info:
        decode_content(raw, "br", 5_000)
    assert info.value.status == 415


def test_records_are_envelopes_keyed_by_tenant_and_project_and_split_when_large():
    result = validate_body(orjson.dumps([{**BASE, "event_id": f"e{i}"} for i in range(100)]), False, 100, CTX)
    parts = encode_events(result.by_project["bot"], max_bytes=1_500)
    assert len(parts) > 1 and all(len(part) <= 1_500 for part in parts)
    records = encode_records("acme", "bot", CTX.received_at_str, parts, max_bytes=4_000)
    assert len(records) > 1 and all(key == record_key("acme", "bot") for key, _ in records)
    envelopes = [orjson.loads(value) for _, value in records]
    assert all(len(value) <= 4_000 for _, value in records)
    assert [e["event_id"] for env in envelopes for e in env["events"]] == [f"e{i}" for i in range(100)]
    assert {(env["v"], env["tenant"], env["project"], env["received_at"]) for env in envelopes} == {
        (1, "acme", "bot", CTX.received_at_str)
    }


# ------------------------------------------------------------------ properties

_json_leaf = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=40)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_field_value = st.one_of(
    _json,
    st.integers(0, 2000),
    st.sampled_from(["openai/gpt-4o", "gpt-4o", "openai", " ", "ok", "error", "2025-06-01T11:59:00Z", "0.25"]),
    st.just({"prompt_tokens": 10, "completion_tokens": 3}),
)
_events = st.dictionaries(
    st.sampled_from(sorted(EVENT_FIELDS)) | st.text(max_size=12), _field_value, max_size=len(EVENT_FIELDS)
) | st.fixed_dictionaries(
    {"project": st.text(min_size=1, max_size=20), "model": st.sampled_from(["openai/gpt-4o", "anthropic/claude"])},
    optional={name: st.integers(0, 500) for name in TOKEN_FIELDS},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_events)
def test_validator_never_raises_and_answers_event_or_field_errors(event):
    normalised, errors = validate_event(event, CTX)
    if normalised is None:
        assert errors and all(set(e) == {"field", "message"} and isinstance(e["field"], str) for e in errors)
        return
    assert errors == []
    assert set(normalised) <= EVENT_FIELDS - {"usage"}
    for sub, parent in TOKEN_PARENTS.items():
        assert normalised.get(sub, 0) <= normalised.get(parent, 0)
    # what the pricing stage requires of an event it prices
    parts = sum(normalised.get(k, 0) for k in ("cache_read_tokens", "cache_write_tokens", "input_audio_tokens"))
    assert parts <= normalised["input_tokens"]
    assert (
        normalised.get("reasoning_tokens", 0) + normalised.get("output_audio_tokens", 0) <= normalised["output_tokens"]
    )
    # normalising is idempotent: the published form validates to itself
    assert validate_event(normalised, CTX) == (normalised, [])


@settings(max_examples=150, deadline=None)
@given(st.lists(_events, min_size=1, max_size=8))
def test_every_event_of_a_body_is_accepted_or_rejected_once(events):
    result = validate_body(msgspec.json.encode(events), False, 100, CTX)
    assert result.accepted + len(result.rejected) == len(events)
    assert [r["index"] for r in result.rejected] == sorted({r["index"] for r in result.rejected})


# ------------------------------------------------------------------ the next stage


@pytest.fixture(scope="module")
def catalog():
    from spendstream.pricing.catalog import default_catalog

    return default_catalog()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_events)
def test_every_accepted_event_is_priceable(catalog, event):
    """The pricing stage never sends to the DLQ what the gateway acknowledged."""
    from spendstream.pricing.logic import price

    normalised, _ = validate_event(event, CTX)
    if normalised is not None:
        line = price(normalised, catalog)  # raises PricingError (a DLQ reason) for a contract breach
        assert line.cost_nanos == sum(line.cost.values()) and line.cost_nanos >= 0


@pytest.mark.parametrize("name", ["openai_chat_cached_reasoning", "openai_chat_audio", "openai_responses",
                                  "anthropic_cache_write_and_read", "gemini_thinking_cached"])  # fmt: skip
def test_provider_fixture_events_are_priced_by_the_catalog(catalog, name):
    from spendstream.pricing.logic import price

    case = orjson.loads((REPO_ROOT / "tests/fixtures/provider_usage.json").read_bytes())[name]
    event = ok({"project": "p", "provider": case["provider"], "model": case["model"], "usage": case["usage"],
                "timestamp": "2025-06-01T00:00:00Z"})  # fmt: skip
    line = price(event, catalog)
    assert line.pricing_status == "priced" and line.cost_nanos > 0, line


@pytest.mark.parametrize("offset_ms", [-1, 0, 1])
def test_canonical_and_other_forms_agree_at_the_future_limit(offset_ms):
    """Canonical timestamps are compared as strings, others as instants: same verdict at the edge."""
    limit_ms = (CTX.received_ns // 1_000_000) + 5 * 60 * 1000
    at = datetime.fromtimestamp((limit_ms + offset_ms) / 1000, UTC)
    canonical = format_timestamp(at)
    offset_form = at.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="milliseconds")
    verdicts = {validate_event({**BASE, "timestamp": ts}, CTX)[0] is not None for ts in (canonical, offset_form)}
    assert verdicts == {offset_ms <= 0}


@pytest.mark.parametrize("value", ["2025-13-01T00:00:00.000Z", "2025-06-01T12:00:00.0a0Z", "2025-06-01T12:00:60.000Z"])
def test_canonical_looking_garbage_is_rejected(value):
    assert rejected({**BASE, "timestamp": value})[0]["field"] == "timestamp"
