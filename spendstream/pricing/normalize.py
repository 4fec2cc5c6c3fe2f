"""Name and time normalisation for the price catalog. Pure: no IO.

Two layers, applied in this order by :meth:`spendstream.pricing.catalog.Catalog.resolve`:

1. genai-prices' own decisions, reproduced exactly: provider ids and ``provider_match`` rules,
   the models' ``match`` rules (first match in catalog order wins), ``fallback_model_providers``,
   the LiteLLM ``provider/model`` split and the compact-date retry (``gpt-5.2-20251211``).
   :func:`compile_match` turns the catalog's match clauses into plain predicates once.
2. Only when layer 1 finds nothing: forms genai-prices does not know. :func:`provider_alias_key`
   compares provider names without separators and a trailing "ai" (``fireworks_ai`` ->
   ``fireworks``), and :func:`model_ref_candidates` rewrites a model name into progressively
   more canonical forms (``openai/gpt-4o`` -> ``gpt-4o``, Bedrock ARNs, region prefixes and
   ``-v1:0`` suffixes, ``.../models/<name>/...`` paths, OpenRouter ``:nitro``-style routing
   suffixes, Vertex ``@date``). Each form is then matched with layer 1's rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from genai_prices import types as gp

Predicate = Callable[[str], bool]


def compile_match(clause: Any) -> Predicate:
    """A predicate equal to ``clause.is_match(text)`` for the genai-prices clause types.

    Callers pass lower-cased text, as genai-prices does before matching models, so the
    literal clauses compare against their lower-cased operand; regexes stay case-sensitive,
    exactly like genai-prices' ``ClauseRegex``.
    """
    if isinstance(clause, gp.ClauseEquals):
        return clause.equals.lower().__eq__
    if isinstance(clause, gp.ClauseStartsWith):
        prefix = clause.starts_with.lower()
        return lambda text: text.startswith(prefix)
    if isinstance(clause, gp.ClauseEndsWith):
        suffix = clause.ends_with.lower()
        return lambda text: text.endswith(suffix)
    if isinstance(clause, gp.ClauseContains):
        needle = clause.contains.lower()
        return lambda text: needle in text
    if isinstance(clause, gp.ClauseRegex):
        search = re.compile(clause.regex).search
        return lambda text: search(text) is not None
    if isinstance(clause, gp.ClauseOr):
        parts = tuple(compile_match(c) for c in clause.or_)
        return lambda text: any(p(text) for p in parts)
    if isinstance(clause, gp.ClauseAnd):
        parts = tuple(compile_match(c) for c in clause.and_)
        return lambda text: all(p(text) for p in parts)
    raise TypeError(f"unsupported genai-prices match clause {type(clause).__name__}")


_COMPACT_DATE = re.compile(r"(-)(20\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?=-|:|$)")


def dash_compact_dates(model_ref: str) -> str:
    """``gpt-5.2-20251211`` -> ``gpt-5.2-2025-12-11``: genai-prices' retry for LiteLLM/OpenRouter refs."""

    def dashed(m: re.Match[str]) -> str:
        year, month, day = int(m.group(2)), int(m.group(3)), int(m.group(4))
        try:
            date(year, month, day)
        except ValueError:
            return m.group(0)
        return f"-{year:04d}-{month:02d}-{day:02d}"

    return _COMPACT_DATE.sub(dashed, model_ref)


_SEPARATORS = re.compile(r"[\s._-]+")


def provider_alias_key(name: str) -> str:
    """Comparison key for provider names genai-prices does not recognise.

    ``fireworks_ai``, ``Fireworks-AI`` and ``fireworks`` share the key ``fireworks``; ``open_router``
    and ``openrouter`` share ``openrouter``. The catalog compares it with its providers' ids.
    """
    key = _SEPARATORS.sub("", name.lower())
    return key[:-2] if key.endswith("ai") and len(key) > 4 else key


_BEDROCK_REGION = re.compile(r"^(?:us|us-gov|eu|apac|ap|ca|jp|au|global)\.(?=[a-z0-9-]+\.)")
_BEDROCK_VENDOR_VERSION = re.compile(
    r"^(?:anthropic|meta|amazon|mistral|cohere|ai21|deepseek|openai|qwen|writer|moonshot|google)\."
    r"(?P<model>.+?)(?:-v\d+(?::\d+)?)?(?::\d+k?)?$"
)
_MODELS_PATH = re.compile(r"(?:^|/)models/(?P<model>[^/]+)")
#: OpenRouter routing suffixes that do not change the model; ``:free`` does (it is a free tier),
#: so it is never stripped and an unlisted ``:free`` model stays unknown instead of paid.
_ROUTING_SUFFIX = re.compile(r":(?:nitro|floor|online|beta|extended|exacto|thinking)$")


def model_ref_candidates(model_ref: str) -> list[tuple[str | None, str]]:
    """Rewrites of a lower-cased model ref that genai-prices did not match, most literal first.

    Each item is ``(provider_hint, ref)``: ``provider_hint`` is the prefix of a ``provider/model``
    form, which names the provider when the event's own provider is not in the catalog.
    Every rewrite applies to the previous one, so ``bedrock/us.anthropic.claude-x-v1:0`` yields
    ``us.anthropic.claude-x-v1:0``, then ``anthropic.claude-x-v1:0``, then ``claude-x``. Routing
    suffixes go first so ``openai/gpt-4o:nitro`` still meets OpenRouter's ``openai/gpt-4o``.
    """
    out: list[tuple[str | None, str]] = []
    hint: str | None = None
    ref = model_ref

    def add(new_ref: str) -> None:
        nonlocal ref
        if new_ref and new_ref != ref:
            ref = new_ref
            out.append((hint, ref))

    add(ref.strip())
    if ref.startswith("arn:"):
        add(ref.rsplit("/", 1)[-1])
    add(_ROUTING_SUFFIX.sub("", ref))
    if (path := _MODELS_PATH.search(ref)) is not None:
        add(path.group("model"))
    elif "/" in ref:
        hint, rest = ref.split("/", 1)
        add(rest)
    add(_BEDROCK_REGION.sub("", ref))
    if (bedrock := _BEDROCK_VENDOR_VERSION.match(ref)) is not None:
        add(bedrock.group("model"))
    add(ref.replace("@", "-"))
    return out


def utc_instant(timestamp: str) -> datetime:
    """RFC 3339 -> aware UTC datetime; naive times are UTC, as genai-prices treats them."""
    instant = datetime.fromisoformat(timestamp)
    if instant.tzinfo is None:
        return instant.replace(tzinfo=UTC)
    return instant.astimezone(UTC)


def utc_date_str(timestamp: str) -> str:
    """The UTC calendar date of an event time as ``YYYY-MM-DD``.

    Contract v1 timestamps are UTC with a ``Z`` suffix, so the date is the first ten characters;
    other offsets take the parsing path. genai-prices compares start dates on the UTC date too.
    """
    if timestamp[-1:] == "Z" and timestamp[10:11] == "T":
        return timestamp[:10]
    return utc_instant(timestamp).date().isoformat()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_micros(instant: datetime) -> int:
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def micros_of_day(instant: datetime) -> int:
    return ((instant.hour * 60 + instant.minute) * 60 + instant.second) * 1_000_000 + instant.microsecond
