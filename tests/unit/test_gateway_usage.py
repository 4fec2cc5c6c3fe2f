"""Provider-native usage objects -> contract v1 token fields (real-shaped payloads)."""

from __future__ import annotations

import pytest
from genai_prices import extract_usage

from ingest_gateway.usage import normalise_usage

OPENAI_CHAT_O3 = {  # o3-mini chat completion: cached prompt + hidden reasoning
    "prompt_tokens": 2006,
    "completion_tokens": 300,
    "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 192,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
OPENAI_CHAT_AUDIO = {  # gpt-4o-audio-preview
    "prompt_tokens": 540,
    "completion_tokens": 830,
    "total_tokens": 1370,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 400},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 700},
}
OPENAI_RESPONSES = {
    "input_tokens": 5000,
    "input_tokens_details": {"cached_tokens": 4096},
    "output_tokens": 1200,
    "output_tokens_details": {"reasoning_tokens": 1024},
    "total_tokens": 6200,
}
ANTHROPIC_CACHED = {  # messages API with a 1h and a 5m cache breakpoint, then a cache hit
    "input_tokens": 21,
    "cache_creation_input_tokens": 2051,
    "cache_read_input_tokens": 10000,
    "cache_creation": {"ephemeral_5m_input_tokens": 51, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 393,
    "service_tier": "standard",
    "server_tool_use": {"web_search_requests": 0},
}
GEMINI_THINKING = {  # gemini-2.5-flash with thinking and implicit caching
    "promptTokenCount": 1500,
    "candidatesTokenCount": 200,
    "thoughtsTokenCount": 1000,
    "cachedContentTokenCount": 1024,
    "totalTokenCount": 2700,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1400}, {"modality": "AUDIO", "tokenCount": 100}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 1024}],
    "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 200}],
}


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (OPENAI_CHAT_O3, {"input_tokens": 2006, "output_tokens": 300, "cache_read_tokens": 1920, "reasoning_tokens": 192}),
        (
            OPENAI_CHAT_AUDIO,
            {"input_tokens": 540, "output_tokens": 830, "input_audio_tokens": 400, "output_audio_tokens": 700},
        ),
        (
            OPENAI_RESPONSES,
            {"input_tokens": 5000, "output_tokens": 1200, "cache_read_tokens": 4096, "reasoning_tokens": 1024},
        ),
        # Anthropic counts input EXCLUDING cache: 21 + 2051 written + 10000 read
        (
            ANTHROPIC_CACHED,
            {
                "input_tokens": 12072,
                "output_tokens": 393,
                "cache_read_tokens": 10000,
                "cache_write_tokens": 2051,
                "cache_write_1h_tokens": 2000,
            },
        ),
        # Gemini: cached content is inside promptTokenCount, thoughts are outside candidatesTokenCount
        (
            GEMINI_THINKING,
            {
                "input_tokens": 1500,
                "output_tokens": 1200,
                "cache_read_tokens": 1024,
                "reasoning_tokens": 1000,
                "input_audio_tokens": 100,
            },
        ),
        ({"usageMetadata": GEMINI_THINKING}, {"input_tokens": 1500, "output_tokens": 1200, "cache_read_tokens": 1024,
                                              "reasoning_tokens": 1000, "input_audio_tokens": 100}),  # fmt: skip
        # older SDKs send explicit nulls for absent cache counts
        (
            {"input_tokens": 10, "cache_creation_input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 3},
            {"input_tokens": 10, "output_tokens": 3},
        ),
        # cache_creation split without the total: the total is the sum of the split
        (
            {"input_tokens": 5, "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20},
             "output_tokens": 1},
            {"input_tokens": 35, "output_tokens": 1, "cache_write_tokens": 30, "cache_write_1h_tokens": 20},
        ),  # fmt: skip
        ({"prompt_tokens": 8, "total_tokens": 8}, {"input_tokens": 8, "output_tokens": 0}),  # embeddings
    ],
    ids=["openai-chat-cached-reasoning", "openai-chat-audio", "openai-responses", "anthropic-cache",
         "gemini-thinking", "gemini-wrapped", "anthropic-nulls", "anthropic-split-only", "openai-embeddings"],  # fmt: skip
)
def test_provider_usage_normalises_to_contract_fields(usage, expected):
    counts, errors = normalise_usage(usage)
    assert errors == []
    assert counts == expected


@pytest.mark.parametrize(
    ("response", "provider", "flavor", "ours"),
    [
        ({"model": "o3-mini", "usage": OPENAI_CHAT_O3}, "openai", "chat", OPENAI_CHAT_O3),
        ({"model": "gpt-4o-audio-preview", "usage": OPENAI_CHAT_AUDIO}, "openai", "chat", OPENAI_CHAT_AUDIO),
        ({"model": "o3", "usage": OPENAI_RESPONSES}, "openai", "responses", OPENAI_RESPONSES),
        ({"model": "claude-sonnet-4-5", "usage": ANTHROPIC_CACHED}, "anthropic", "default", ANTHROPIC_CACHED),
        ({"modelVersion": "gemini-2.5-flash", "usageMetadata": GEMINI_THINKING}, "google", "default", GEMINI_THINKING),
    ],
)
def test_agrees_with_genai_prices_extractors(response, provider, flavor, ours):
    """The price catalog's own extractors count the same tokens (where both have the class)."""
    extracted = extract_usage(response, provider_id=provider, api_flavor=flavor)
    usage = extracted.usage
    counts, errors = normalise_usage(ours)
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
        ({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": "3"}}, "usage.prompt_tokens_details.cached_tokens",
         "integer"),  # fmt: skip
        ({"prompt_tokens": 5, "completion_tokens_details": []}, "usage.completion_tokens_details", "object"),
        ({"input_tokens": True, "output_tokens": 1}, "usage.input_tokens", "integer"),
        ({"output_tokens": 3, "cache_read_input_tokens": 2}, "usage.input_tokens", "required"),
        ({"promptTokenCount": 3, "promptTokensDetails": {"modality": "AUDIO"}}, "usage.promptTokensDetails", "array"),
        ({"promptTokenCount": 3, "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 1.5}]},
         "usage.promptTokensDetails[0].tokenCount", "integer"),  # fmt: skip
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
