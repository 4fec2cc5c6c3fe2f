"""OpenAPI description of ``POST /v1/events``.

The endpoint parses raw bytes itself (orjson + ``logic.validate_event``) for speed, so FastAPI
cannot derive the request body: it is declared here, from the same limits the validator uses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ingest_gateway import logic
from ingest_gateway.usage import MAX_TOKENS
from spendstream.contracts import TOKEN_FIELDS


def _string(max_len: int, min_len: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_len, "minLength": min_len, **extra}


_TOKEN = {"type": "integer", "minimum": 0, "maximum": MAX_TOKENS}

EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "UsageEvent",
    "description": "Contract v1 usage event. Give token fields or a provider's raw `usage` object, not both. "
    "input_tokens INCLUDES cache read/write and audio input; output_tokens INCLUDES reasoning and audio output. "
    "Unknown fields are rejected.",
    "additionalProperties": False,
    "required": ["model"],
    "properties": {
        "event_id": _string(logic.MAX_ID_LEN, 1, description="idempotency key; a UUIDv7 is generated when absent"),
        "timestamp": {
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 event time; absent = receive time; at most 5 minutes in the future",
        },
        "project": _string(
            logic.MAX_ID_LEN,
            1,
            pattern=r"\S",
            description="required unless a project mapping rule of the tenant matches the event's session_label or agent",
        ),
        "agent": _string(logic.MAX_ID_LEN, 1, pattern=r"\S", default="default"),
        "user": _string(logic.MAX_ATTRIBUTION_LEN),
        "session_id": _string(logic.MAX_ATTRIBUTION_LEN),
        "operation": _string(logic.MAX_ATTRIBUTION_LEN),
        "session_label": _string(
            logic.MAX_ATTRIBUTION_LEN, description="a session's name, e.g. peakpaws-safety-review"
        ),
        "session_type": _string(
            logic.MAX_SESSION_TYPE_LEN, description="main, subagent, heartbeat or any short string"
        ),
        "tags": {
            "type": "object",
            "maxProperties": logic.MAX_TAGS,
            "additionalProperties": _string(logic.MAX_TAG_VALUE_LEN),
            "propertyNames": {"maxLength": logic.MAX_TAG_KEY_LEN},
        },
        "provider": _string(
            logic.MAX_MODEL_LEN, 1, pattern=r"\S", description="required unless model is written 'provider/model'"
        ),
        "model": _string(logic.MAX_MODEL_LEN, 1, pattern=r"\S", examples=["gpt-4o", "openai/gpt-4o"]),
        **{name: dict(_TOKEN) for name in TOKEN_FIELDS},
        "usage": {
            "type": "object",
            "description": "a provider's raw usage object: OpenAI chat/Responses `usage`, Anthropic messages "
            "`usage`, or Gemini `usageMetadata`; normalised to the token fields by the gateway",
        },
        "cost_usd": {
            "description": "client-side price in USD (decimal string preferred)",
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*$"},
                {"type": "number", "minimum": 0, "maximum": int(logic.MAX_COST_USD)},
            ],
        },
        "latency_ms": {"type": "integer", "minimum": 0, "maximum": logic.MAX_LATENCY_MS},
        "status": {"type": "string", "enum": list(logic.STATUSES), "default": "ok"},
    },
}

_TOKENS_EXAMPLE = {
    "event_id": "0190f5b2-7c1e-7a3b-9f00-1c2d3e4f5a6b",
    "timestamp": "2025-06-01T12:00:00.000Z",
    "project": "support-bot",
    "agent": "triage",
    "user": "u-42",
    "provider": "openai",
    "model": "gpt-4o-mini",
    "input_tokens": 1200,
    "output_tokens": 300,
    "cache_read_tokens": 1024,
    "latency_ms": 850,
    "tags": {"env": "prod"},
}
_ANTHROPIC_EXAMPLE = {
    "project": "support-bot",
    "model": "anthropic/claude-sonnet-4-5",
    "usage": {
        "input_tokens": 50,
        "cache_creation_input_tokens": 2000,
        "cache_read_input_tokens": 10000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 500},
        "output_tokens": 400,
    },
}
_GEMINI_EXAMPLE = {
    "project": "research",
    "provider": "google",
    "model": "gemini-2.5-flash",
    "usage": {
        "promptTokenCount": 900,
        "candidatesTokenCount": 120,
        "thoughtsTokenCount": 300,
        "cachedContentTokenCount": 512,
    },
}


def request_body(max_events: int, max_bytes: int) -> dict[str, Any]:
    """``openapi_extra`` of the endpoint: its body, with the configured limits."""
    return {"requestBody": {
        "required": True,
        "description": f"One event, a JSON array of up to {max_events} events, or NDJSON (one event per line); "
        f"at most {max_bytes} bytes, before and after `Content-Encoding: gzip`.",
        "content": {
            "application/json": {
                "schema": {"anyOf": [EVENT_SCHEMA, {"type": "array", "items": EVENT_SCHEMA, "minItems": 1}]},
                "examples": {
                    "single": {"summary": "one event with token fields", "value": _TOKENS_EXAMPLE},
                    "batch": {
                        "summary": "an array of events (the fast path for fleets)",
                        "value": [_TOKENS_EXAMPLE, {**_TOKENS_EXAMPLE, "event_id": None, "output_tokens": 120}],
                    },
                    "anthropic_usage": {"summary": "Anthropic usage object, cache counted apart", "value": _ANTHROPIC_EXAMPLE},
                    "gemini_usage": {"summary": "Gemini usageMetadata with thinking tokens", "value": _GEMINI_EXAMPLE},
                },
            },
            "application/x-ndjson": {
                "schema": {"type": "string", "description": "one JSON event object per line"},
                "examples": {
                    "ndjson": {
                        "summary": "two events as NDJSON",
                        "value": '{"project":"p","provider":"openai","model":"gpt-4o","input_tokens":10,"output_tokens":2}\n'
                        '{"project":"p","model":"anthropic/claude-3-5-haiku","usage":{"input_tokens":5,"output_tokens":1}}\n',
                    }
                },
            },
        },
    }}  # fmt: skip


class FieldError(BaseModel):
    field: str = Field(examples=["input_tokens"])
    message: str = Field(examples=["must be >= 0"])


class Rejection(BaseModel):
    index: int = Field(description="position of the event in the request (0-based)")
    event_id: str | None = Field(description="the event_id the client sent, if any")
    errors: list[FieldError]


class IngestResult(BaseModel):
    accepted: int = Field(description="events acknowledged by Kafka")
    event_ids: list[str] = Field(description="ids of the accepted events, in request order (generated ones included)")
    rejected: list[Rejection]


class ErrorBody(BaseModel):
    error: str = Field(examples=["malformed_json"])
    message: str


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait before retrying"}}


def _responses() -> dict[str, Any]:
    def error(description: str, **extra: Any) -> dict[str, Any]:
        return {"description": description, "content": _json("ErrorBody"), **extra}

    return {
        "202": {"description": "every valid event is acknowledged by Kafka; invalid ones are listed",
                "content": _json("IngestResult")},
        "400": {
            "description": "every event invalid (IngestResult), or the body is malformed (ErrorBody naming line/column)",
            "content": {"application/json": {"schema": {"anyOf": [
                {"$ref": "#/components/schemas/IngestResult"}, {"$ref": "#/components/schemas/ErrorBody"}]}}},
        },
        "401": error("missing or unknown API key", headers={"WWW-Authenticate": {"schema": {"type": "string"}}}),
        "403": error("the API key lacks the `ingest` scope"),
        "413": error("too many events or too many bytes"),
        "415": error("unsupported Content-Type or Content-Encoding"),
        "429": error("too many events waiting for the broker; retry after Retry-After seconds", headers=_RETRY_AFTER),
        "503": error("the broker did not acknowledge; nothing was accepted; retry after Retry-After seconds",
                     headers=_RETRY_AFTER),
    }  # fmt: skip


def add_ingest_path(schema: dict[str, Any], max_events: int, max_bytes: int) -> dict[str, Any]:
    """Describe ``POST /v1/events`` (served by ``ingest.IngestMiddleware``) in an OpenAPI document."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in (IngestResult, ErrorBody):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(model_schema.pop("$defs", {}))
        schemas[model.__name__] = model_schema
    components.setdefault("securitySchemes", {})["ApiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key with the `ingest` scope: `Authorization: Bearer ss_<id>_<secret>`",
    }
    schema.setdefault("paths", {})["/v1/events"] = {
        "post": {
            "tags": ["ingest"],
            "summary": "Ingest usage events",
            "description": "Validate and normalise events, publish the valid ones to `spendstream.usage.raw`, and "
            "answer 202 once Kafka acknowledged all of them. Invalid events are listed with the fields at fault; "
            "when none is valid the answer is 400. Retrying with the returned `event_ids` is safe.",
            "operationId": "ingest_events",
            "security": [{"ApiKey": []}],
            **request_body(max_events, max_bytes),
            "responses": _responses(),
        }
    }
    return schema
