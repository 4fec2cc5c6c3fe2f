"""A proxied call's cost: the most it may cost (reserved before forwarding, for hard budgets) and
what it cost (settled when it ends). Pure: the price catalog is the pricing stage's (genai-prices,
compiled), so a settled cost is the cost the pricing stage stores for the call's event, unless the
tenant has a price override (the reservation then uses catalog prices; docs/proxy.md).

The maximum (docs/proxy.md, "Estimate"):
- input: the request body's length in bytes, as tokens. A token of the providers' tokenizers
  stands for at least one byte of UTF-8 text, so the body's length bounds the prompt's tokens
  (JSON syntax, field names and base64 images only add bytes: images are billed far below their
  base64 size). Priced at the dearest input rate the model has (plain input or 1-hour cache
  writes, whichever costs more), at the tier the count falls in.
- output: the request's cap (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``);
  without one, the model's context window from the catalog, else ``proxy.uncapped_output_tokens``.
A model the catalog cannot price has no maximum: ``None``.
"""

from __future__ import annotations

from typing import Any

from genai_prices.data_snapshot import get_snapshot

from spendstream.money import MAX_TOKENS_PER_EVENT
from spendstream.pricing import Catalog, PricingError, price


def context_window(provider: str, model: str) -> int | None:
    try:
        _, info = get_snapshot().find_provider_model(model, None, provider, None)
    except (LookupError, ValueError):
        return None
    window = getattr(info, "context_window", None)
    return window if isinstance(window, int) and window > 0 else None


def output_bound(provider: str, model: str, cap: int | None, uncapped: int) -> int:
    if cap is not None:
        return cap
    return context_window(provider, model) or uncapped


def cost_nanos(catalog: Catalog, event: dict[str, Any]) -> int | None:
    """The catalog cost of a contract-v1 event (with ``timestamp``), or None when unpriced."""
    try:
        line = price(event, catalog)
    except PricingError:
        return None
    return line.cost_nanos if line.pricing_status == "priced" else None


def max_cost_nanos(
    catalog: Catalog, provider: str, model: str, body_bytes: int, output_tokens: int, timestamp: str
) -> int | None:
    """The most a call may cost (see module doc), or None when the model has no price."""
    input_tokens = min(body_bytes, MAX_TOKENS_PER_EVENT)
    output_tokens = min(output_tokens, MAX_TOKENS_PER_EVENT)
    base = {"provider": provider, "model": model, "timestamp": timestamp, "output_tokens": output_tokens}
    plain = cost_nanos(catalog, {**base, "input_tokens": input_tokens})
    if plain is None:
        return None
    cache_1h = cost_nanos(
        catalog,
        {
            **base,
            "input_tokens": input_tokens,
            "cache_write_tokens": input_tokens,
            "cache_write_1h_tokens": input_tokens,
        },
    )
    return max(plain, cache_1h or 0)
