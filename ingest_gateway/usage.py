"""Provider-native ``usage`` objects -> contract v1 token fields. Pure: no IO imports.

Contract v1 counts ``input_tokens`` INCLUDING cache reads/writes and audio input, and
``output_tokens`` INCLUDING reasoning and audio output. Providers disagree:

- OpenAI chat completions (``prompt_tokens``...) and the Responses API (``input_tokens`` with
  ``input_tokens_details``) already include cached and audio tokens in the totals.
- Anthropic messages report ``input_tokens`` EXCLUDING ``cache_creation_input_tokens`` and
  ``cache_read_input_tokens``: the three are added up here.
- Gemini ``usageMetadata`` includes ``cachedContentTokenCount`` in ``promptTokenCount`` but
  reports ``thoughtsTokenCount`` (and tool-use prompt tokens) apart from the candidates: added here.

The shape of the object decides the flavour, not the event's ``provider`` (Bedrock, Azure,
Vertex and OpenAI-compatible routers pass these shapes through unchanged). Fields a provider adds
that carry no token count we price (``service_tier``, ``server_tool_use``...) are ignored: the
object is the provider's, not ours.
"""

from __future__ import annotations

from typing import Any

from spendstream.money import MAX_TOKENS_PER_EVENT

#: per token field; the caps and their arithmetic are in spendstream/money.py
MAX_TOKENS = MAX_TOKENS_PER_EVENT

FieldErrors = list[dict[str, str]]

_ANTHROPIC_MARKERS = frozenset(("cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation"))
_OPENAI_RESPONSES_MARKERS = frozenset(("input_tokens_details", "output_tokens_details", "total_tokens"))


def token_count_error(value: Any) -> str | None:
    """Why ``value`` is not a token count, or None when it is one."""
    if type(value) is not int:
        return "must be an integer"
    if value < 0:
        return "must be >= 0"
    if value > MAX_TOKENS:
        return f"must be <= {MAX_TOKENS}"
    return None


class _Reader:
    """Reads optional counts out of nested provider objects, collecting errors with their paths."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: FieldErrors = []

    def obj(self, parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
        value = parent.get(key)
        if value is None:
            return {}
        if type(value) is not dict:
            self.errors.append({"field": f"{path}.{key}", "message": "must be an object"})
            return {}
        return value

    def count(self, parent: dict[str, Any], key: str, path: str, required: bool = False) -> int:
        value = parent.get(key)
        if value is None:
            if required:
                self.errors.append({"field": f"{path}.{key}", "message": "field required"})
            return 0
        problem = token_count_error(value)
        if problem:
            self.errors.append({"field": f"{path}.{key}", "message": problem})
            return 0
        return value

    def modality(self, parent: dict[str, Any], key: str, path: str, modality: str) -> int:
        """Sum of ``tokenCount`` over Gemini ``[{"modality": ..., "tokenCount": n}]`` entries."""
        items = parent.get(key)
        if items is None:
            return 0
        if type(items) is not list:
            self.errors.append({"field": f"{path}.{key}", "message": "must be an array"})
            return 0
        total = 0
        for i, item in enumerate(items):
            if type(item) is not dict:
                self.errors.append({"field": f"{path}.{key}[{i}]", "message": "must be an object"})
            elif item.get("modality") == modality:
                total += self.count(item, "tokenCount", f"{path}.{key}[{i}]")
        return total


def _openai_chat(u: dict[str, Any], r: _Reader, p: str) -> dict[str, int]:
    prompt = r.obj(u, "prompt_tokens_details", p)
    completion = r.obj(u, "completion_tokens_details", p)
    pd, cd = f"{p}.prompt_tokens_details", f"{p}.completion_tokens_details"
    return {
        "input_tokens": r.count(u, "prompt_tokens", p, required=True),
        # embeddings responses carry no completion_tokens
        "output_tokens": r.count(u, "completion_tokens", p),
        "cache_read_tokens": r.count(prompt, "cached_tokens", pd),
        # OpenAI-compatible routers (OpenRouter) report cache writes here
        "cache_write_tokens": r.count(prompt, "cache_write_tokens", pd),
        "input_audio_tokens": r.count(prompt, "audio_tokens", pd),
        "reasoning_tokens": r.count(completion, "reasoning_tokens", cd),
        "output_audio_tokens": r.count(completion, "audio_tokens", cd),
    }


def _openai_responses(u: dict[str, Any], r: _Reader, p: str) -> dict[str, int]:
    inp = r.obj(u, "input_tokens_details", p)
    out = r.obj(u, "output_tokens_details", p)
    return {
        "input_tokens": r.count(u, "input_tokens", p, required=True),
        "output_tokens": r.count(u, "output_tokens", p),
        "cache_read_tokens": r.count(inp, "cached_tokens", f"{p}.input_tokens_details"),
        "cache_write_tokens": r.count(inp, "cache_write_tokens", f"{p}.input_tokens_details"),
        "reasoning_tokens": r.count(out, "reasoning_tokens", f"{p}.output_tokens_details"),
    }


def _anthropic(u: dict[str, Any], r: _Reader, p: str) -> dict[str, int]:
    uncached = r.count(u, "input_tokens", p, required=True)
    cache_read = r.count(u, "cache_read_input_tokens", p)
    split = r.obj(u, "cache_creation", p)
    write_5m = r.count(split, "ephemeral_5m_input_tokens", f"{p}.cache_creation")
    write_1h = r.count(split, "ephemeral_1h_input_tokens", f"{p}.cache_creation")
    if u.get("cache_creation_input_tokens") is None:
        cache_write = write_5m + write_1h
    else:
        cache_write = r.count(u, "cache_creation_input_tokens", p)
    return {
        "input_tokens": uncached + cache_read + cache_write,
        "output_tokens": r.count(u, "output_tokens", p),
        "cache_read_tokens": cache_read,
        "cache_write_tokens": cache_write,
        "cache_write_1h_tokens": write_1h,
    }


def _gemini(u: dict[str, Any], r: _Reader, p: str) -> dict[str, int]:
    thoughts = r.count(u, "thoughtsTokenCount", p)
    return {
        "input_tokens": r.count(u, "promptTokenCount", p) + r.count(u, "toolUsePromptTokenCount", p),
        "output_tokens": r.count(u, "candidatesTokenCount", p) + thoughts,
        "cache_read_tokens": r.count(u, "cachedContentTokenCount", p),
        "reasoning_tokens": thoughts,
        "input_audio_tokens": r.modality(u, "promptTokensDetails", p, "AUDIO")
        + r.modality(u, "toolUsePromptTokensDetails", p, "AUDIO"),
        "output_audio_tokens": r.modality(u, "candidatesTokensDetails", p, "AUDIO"),
    }


def normalise_usage(usage: Any, path: str = "usage") -> tuple[dict[str, int], FieldErrors]:
    """Token fields of contract v1 (zeros omitted, input/output always present) or field errors.

    Accepts an OpenAI chat-completions or Responses ``usage``, an Anthropic messages ``usage`` or
    a Gemini ``usageMetadata`` (bare, or wrapped as ``{"usageMetadata": {...}}``).
    """
    if type(usage) is not dict:
        return {}, [{"field": path, "message": "must be an object (a provider's usage object)"}]
    if type(usage.get("usageMetadata")) is dict:
        usage, path = usage["usageMetadata"], f"{path}.usageMetadata"
    r = _Reader()
    if "prompt_tokens" in usage:
        counts = _openai_chat(usage, r, path)
    elif "promptTokenCount" in usage or "candidatesTokenCount" in usage:
        counts = _gemini(usage, r, path)
    elif "input_tokens" in usage or not _ANTHROPIC_MARKERS.isdisjoint(usage):
        anthropic = not _ANTHROPIC_MARKERS.isdisjoint(usage)
        if anthropic and not _OPENAI_RESPONSES_MARKERS.isdisjoint(usage):
            return {}, [
                {
                    "field": path,
                    "message": "mixes Anthropic (cache_*_input_tokens) and OpenAI Responses "
                    "(*_tokens_details) fields; cache semantics differ, send one provider's object",
                }
            ]
        # Without cache fields both flavours count the same, so the choice only matters with them.
        counts = _anthropic(usage, r, path) if anthropic else _openai_responses(usage, r, path)
    else:
        return {}, [
            {
                "field": path,
                "message": "unrecognised usage object: expected OpenAI chat (prompt_tokens) or "
                "Responses (input_tokens), Anthropic messages (input_tokens, cache_*_input_tokens) "
                "or Gemini usageMetadata (promptTokenCount)",
            }
        ]
    if r.errors:
        return {}, r.errors
    # a total added up here (Anthropic input, Gemini input/output) is bounded like a given one
    too_many = [
        {"field": path, "message": f"{name} adds up to {count}, more than {MAX_TOKENS}"}
        for name, count in counts.items()
        if count > MAX_TOKENS
    ]
    if too_many:
        return {}, too_many
    return {k: v for k, v in counts.items() if v or k in ("input_tokens", "output_tokens")}, []
