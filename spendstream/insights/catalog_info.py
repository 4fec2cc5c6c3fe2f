"""What recommendations know beyond the compiled price catalog: a curated substitution table, the
providers' batch discounts and the models' context windows. Pure (reads the installed
genai-prices data).
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache

from spendstream.pricing.catalog import Catalog, CatalogModel

#: (catalog provider id, model id) -> the cheaper model of the same provider and a comparable
#: generation an agent with short outputs can usually use instead. Curated: a substitution is a
#: product judgement, not a price comparison.
SUBSTITUTIONS: dict[tuple[str, str], str] = {
    ("openai", "gpt-4o"): "gpt-4o-mini",
    ("openai", "chatgpt-4o-latest"): "gpt-4o-mini",
    ("openai", "gpt-4.1"): "gpt-4.1-mini",
    ("openai", "gpt-4.1-mini"): "gpt-4.1-nano",
    ("anthropic", "claude-3-opus-latest"): "claude-3-5-sonnet",
    ("anthropic", "claude-3-5-sonnet"): "claude-3-5-haiku-latest",
    ("anthropic", "claude-3-7-sonnet-latest"): "claude-3-5-haiku-latest",
    ("anthropic", "claude-opus-4-0"): "claude-sonnet-4-0",
    ("anthropic", "claude-opus-4-1"): "claude-sonnet-4-0",
    ("anthropic", "claude-opus-4-5"): "claude-sonnet-4-5",
    ("anthropic", "claude-opus-4-6"): "claude-sonnet-4-6",
    ("anthropic", "claude-sonnet-4-0"): "claude-haiku-4-5",
    ("anthropic", "claude-sonnet-4-5"): "claude-haiku-4-5",
    ("anthropic", "claude-sonnet-4-6"): "claude-haiku-4-5",
    ("google", "gemini-2.5-pro"): "gemini-2.5-flash",
    ("google", "gemini-2.5-flash"): "gemini-2.5-flash-lite",
}

#: Batch API discount per provider (the catalog has no batch prices): OpenAI Batch API, Anthropic
#: Message Batches and Gemini Batch Mode each charge half the synchronous price (providers' pricing
#: pages, 2025).
BATCH_DISCOUNTS: dict[str, Decimal] = {
    "openai": Decimal("0.5"),
    "anthropic": Decimal("0.5"),
    "google": Decimal("0.5"),
}


@lru_cache(maxsize=1)
def context_windows() -> dict[tuple[str, str], int]:
    """(provider id, model id) -> context window in tokens, where genai-prices states one."""
    from genai_prices.data import providers

    return {(p.id, m.id): m.context_window for p in providers for m in p.models if m.context_window}


def context_window(model: CatalogModel) -> int | None:
    return context_windows().get((model.provider_id, model.model_id))


def catalog_model(catalog: Catalog, provider: str, model: str) -> CatalogModel | None:
    return catalog.resolve(provider, model).model


def substitute(catalog: Catalog, model: CatalogModel) -> CatalogModel | None:
    """The curated cheaper model for ``model``, resolved in the catalog (None: no entry)."""
    target = SUBSTITUTIONS.get((model.provider_id, model.model_id))
    return catalog.resolve(model.provider_id, target).model if target else None


def same_provider_models(catalog: Catalog, provider_id: str) -> list[CatalogModel]:
    """Every catalog model of a provider's price list (cost comparison's default set)."""
    return [m for m in catalog.models() if m.provider_id == provider_id]
