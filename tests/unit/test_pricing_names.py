"""Model-name normalisation beyond genai-prices' own lookup (layer 2 of normalize.py)."""

from __future__ import annotations

import pytest
from genai_prices.data_snapshot import get_snapshot

from spendstream.pricing import default_catalog
from spendstream.pricing.catalog import Catalog
from spendstream.pricing.normalize import model_ref_candidates, provider_alias_key

FIREWORKS_DEEPSEEK = "accounts/fireworks/models/deepseek-v3p2"


def genai_model(provider: str, model: str) -> tuple[str, str]:
    found_provider, found_model = get_snapshot().find_provider_model(model, None, provider, None)
    return found_provider.id, found_model.id


@pytest.mark.parametrize(
    ("provider", "model", "same_as"),
    [
        # provider/model prefixes that genai-prices only accepts from OpenRouter or LiteLLM
        ("openai", "openai/gpt-4o", ("openai", "gpt-4o")),
        ("anthropic", "anthropic/claude-3-5-sonnet-20241022", ("anthropic", "claude-3-5-sonnet-20241022")),
        ("azure", "azure/gpt-4o-mini", ("azure", "gpt-4o-mini")),
        ("mistral", "mistral/mistral-large-latest", ("mistral", "mistral-large-latest")),
        # Bedrock ids in other shapes (genai-prices matches some by substring already)
        (
            "aws",
            "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.anthropic.claude-3-7-sonnet-20250219-v1:0",
            ("aws", "eu.anthropic.claude-3-7-sonnet-20250219-v1:0"),
        ),
        ("bedrock", "bedrock/us.meta.llama3-2-90b-instruct-v1:0", ("aws", "us.meta.llama3-2-90b-instruct-v1:0")),
        ("anthropic", "anthropic.claude-3-5-sonnet-20241022-v2:0", ("anthropic", "claude-3-5-sonnet-20241022")),
        # Azure AI Foundry asset ids, OpenRouter routing suffixes, Fireworks spelled the LiteLLM way
        ("azure", "azureml://registries/azure-openai/models/gpt-4o/versions/2024-08-06", ("azure", "gpt-4o")),
        ("openrouter", "openai/gpt-4o:nitro", ("openrouter", "openai/gpt-4o")),
        ("fireworks_ai", FIREWORKS_DEEPSEEK, ("fireworks", FIREWORKS_DEEPSEEK)),
        ("x_ai", "grok-3-mini", ("x-ai", "grok-3-mini")),
        # a provider genai-prices does not know: the model prefix or genai-prices' model-only rule decides
        ("my-llm-proxy", "openai/gpt-4o-mini", ("openai", "gpt-4o-mini")),
        ("my-llm-proxy", "claude-3-5-haiku-20241022", ("anthropic", "claude-3-5-haiku-20241022")),
    ],
)
def test_other_name_forms_resolve_like_their_canonical_name(provider, model, same_as):
    expected_provider, expected_model = genai_model(*same_as)
    try:
        native = genai_model(provider, model)
    except LookupError:
        native = None  # the usual case: only layer 2 knows this form
    assert native in (None, (expected_provider, expected_model))
    resolution = default_catalog().resolve(provider, model)
    assert resolution.model is not None, (provider, model)
    assert (resolution.provider_id, resolution.model.model_id) == (expected_provider, expected_model)


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openrouter", "openai/gpt-4o:free"),  # the free tier is a different price: unknown, never the paid one
        ("openai", "gpt-unreleased-9"),
        ("acme-llm", "house-model-7"),
        ("", ""),
    ],
)
def test_names_nobody_knows_stay_unknown(provider, model):
    resolution = default_catalog().resolve(provider, model)
    assert resolution.model is None
    assert resolution.raw_key == (provider.lower(), model.lower())


def test_candidates_go_from_literal_to_canonical():
    assert model_ref_candidates("bedrock/us.anthropic.claude-3-7-sonnet-20250219-v1:0") == [
        ("bedrock", "us.anthropic.claude-3-7-sonnet-20250219-v1:0"),
        ("bedrock", "anthropic.claude-3-7-sonnet-20250219-v1:0"),
        ("bedrock", "claude-3-7-sonnet-20250219"),
    ]
    assert model_ref_candidates("openai/gpt-4o:nitro") == [(None, "openai/gpt-4o"), ("openai", "gpt-4o")]
    assert model_ref_candidates("gpt-4o") == []


def test_provider_alias_key_ignores_separators_and_ai_suffix():
    assert provider_alias_key("Fireworks_AI") == provider_alias_key("fireworks") == "fireworks"
    assert provider_alias_key("open_router") == provider_alias_key("openrouter")
    assert provider_alias_key("x-ai") == provider_alias_key("xai")


def test_resolutions_are_memoised_and_bounded():
    catalog = Catalog(default_catalog().version, default_catalog().providers, memo_limit=3)
    first = catalog.resolve("openai", "gpt-4o")
    assert catalog.resolve("openai", "gpt-4o") is first
    for i in range(5):
        catalog.resolve("acme", f"model-{i}")
    assert len(catalog._memo) <= 3
    assert catalog.resolve("openai", "gpt-4o") == first
