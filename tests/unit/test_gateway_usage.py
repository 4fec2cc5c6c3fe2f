"""Provider-native usage objects -> contract v1 token fields (real-shaped payloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from genai_prices import extract_usage

from ingest_gateway.usage import normalise_usage

REPO_ROOT = Path(__file__).resolve().parents[2]

#: shared with tests/integration/test_gateway_kafka.py: real-shaped usage objects and their expected fields
PAYLOADS = {k: v for k, v in json.loads((REPO_ROOT / "tests/fixtures/provider_usage.json").read_text()).items()
            if not k.startswith("_")}  # fmt: skip
GEMINI_THINKING = PAYLOADS["gemini_thinking_cached"]["usage"]


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_fixture_payloads_normalise_to_their_expected_fields(name):
    counts, errors = normalise_usage(PAYLOADS[name]["usage"])
    assert errors == []
    assert counts == PAYLOADS[name]["expected"]


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"usageMetadata": GEMINI_THINKING}, PAYLOADS["gemini_thinking_cached"]["expected"]),
        # older SDKs send explicit nulls for absent cache counts
        (
            {
                "input_tokens": 10,
                "cache_creation_input_tokens": None,
                "cache_read_input_tokens": None,
                "output_tokens": 3,
            },
            {"input_tokens": 10, "output_tokens": 3},
        ),
        # cache_creation split without the total: the total is the sum of the split
        (
            {
                "input_tokens": 5,
                "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20},
                "output_tokens": 1,
            },
            {"input_tokens": 35, "output_tokens": 1, "cache_write_tokens": 30, "cache_write_1h_tokens": 20},
        ),  # fmt: skip
        ({"prompt_tokens": 8, "total_tokens": 8}, {"input_tokens": 8, "output_tokens": 0}),  # embeddings
        ({"input_tokens": 8, "output_tokens": 2}, {"input_tokens": 8, "output_tokens": 2}),  # no cache: flavours agree
    ],
    ids=["gemini-wrapped", "anthropic-nulls", "anthropic-split-only", "openai-embeddings", "plain-input-output"],
)
def test_provider_usage_normalises_to_contract_fields(usage, expected):
    counts, errors = normalise_usage(usage)
    assert errors == []
    assert counts == expected


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_agrees_with_genai_prices_extractors(name):
    """The price catalog's own extractors count the same tokens (where both have the class)."""
    case = PAYLOADS[name]
    response = (
        {"modelVersion": case["model"], "usageMetadata": case["usage"]}
        if case["provider"] == "google"
        else {"model": case["model"], "usage": case["usage"]}
    )
    usage = extract_usage(response, provider_id=case["provider"], api_flavor=case["api_flavor"]).usage
    counts, errors = normalise_usage(case["usage"])
    assert errors == []
    assert counts["input_tokens"] == usage.input_tokens
    assert counts["output_tokens"] == (usage.output_tokens or 0)
    assert counts.get("cache_read_tokens", 0) == (usage.cache_read_tokens or 0)
    assert counts.get("cache_write_tokens", 0) == (usage.cache_write_tokens or 0)
    assert counts.get("reasoning_tokens", 0) == (getattr(usage, "output_reasoning_tokens", None) or 0)
    assert counts.get("input_audio_tokens", 0) == (usage.input_audio_tokens or 0)
    assert counts.get("output_audio_tokens", 0) == (usage.output_audio_tokens or 0)


@pytest.mark.parametrize(
    ("usage", "field", "fragment"),
    [
        ("1200 tokens", "usage", "must be an object"),
        ({"total": 5}, "usage", "unrecognised usage object"),
        ({"prompt_tokens": -1}, "usage.prompt_tokens", ">= 0"),
        (
            {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": "3"}},
            "usage.prompt_tokens_details.cached_tokens",
            "integer",
        ),  # fmt: skip
        ({"prompt_tokens": 5, "completion_tokens_details": []}, "usage.completion_tokens_details", "object"),
        ({"input_tokens": True, "output_tokens": 1}, "usage.input_tokens", "integer"),
        ({"output_tokens": 3, "cache_read_input_tokens": 2}, "usage.input_tokens", "required"),
        ({"promptTokenCount": 3, "promptTokensDetails": {"modality": "AUDIO"}}, "usage.promptTokensDetails", "array"),
        (
            {"promptTokenCount": 3, "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 1.5}]},
            "usage.promptTokensDetails[0].tokenCount",
            "integer",
        ),  # fmt: skip
        (
            {"input_tokens": 5, "cache_read_input_tokens": 1, "input_tokens_details": {"cached_tokens": 1}},
            "usage",
            "mixes Anthropic",
        ),
    ],
)
def test_bad_usage_objects_name_the_field(usage, field, fragment):
    counts, errors = normalise_usage(usage)
    assert counts == {}
    assert errors and errors[0]["field"] == field
    assert fragment in errors[0]["message"]
