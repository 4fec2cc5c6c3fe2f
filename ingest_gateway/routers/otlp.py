"""``POST /otlp/v1/traces``: OTLP/HTTP trace exports in, usage events of their model calls out.

So ``OTEL_EXPORTER_OTLP_ENDPOINT=<gateway>/otlp`` with
``OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer <key>`` sends an agent's spans here. Bodies:
``application/x-protobuf`` or ``application/json`` (OTLP JSON), optionally gzip. Each model-call
span becomes one contract v1 event (spendstream/otel/mapping.py), validated like a posted event,
given a project (``spendstream.project``, else the tenant's project mapping rules, else
``otel.default_project``) and published through the same publisher as ``/v1/events``, so the
pricing stage prices it and drops a re-exported span by its event id.

Answers as OTLP clients expect (OTLP spec, "OTLP/HTTP Response"), in the request's encoding:
- 200 ``ExportTraceServiceResponse``; with ``partial_success`` {rejected_spans, error_message}
  when some model-call spans could not become events (the rest are stored). Spans that are not
  model calls (agents, tools) are accepted and cost nothing.
- 400 malformed body, 401/403 key, 405 method, 413 body too large (before and after gzip),
  415 media type or encoding: not retried by exporters. Body: ``google.rpc.Status``
  (JSON requests also get ``error`` and ``field``).
- 429 (this tenant's events waiting for broker acks) and 503 (broker unavailable) with
  ``Retry-After``: exporters retry these with backoff; the retried spans keep their event ids.

``X-Spendstream-Client-Cost: true`` (e.g. in ``OTEL_EXPORTER_OTLP_HEADERS``) opts in to taking
``gen_ai.usage.cost`` as the client price; without it Spendstream prices every span itself.
"""

from __future__ import annotations

import asyncio
import gc
import logging

from fastapi import APIRouter, Request, Response

from ingest_gateway import logic, otlp_events
from ingest_gateway.errors import BodyError, GatewayError, to_http
from ingest_gateway.ingest import authenticate, read_body
from ingest_gateway.metrics import GatewayMetrics
from ingest_gateway.publisher import Publisher
from spendstream.asgi import ClientGone
from spendstream.otel import MappedExport, OtlpDecodeError, decode_json
from spendstream.otel.wire import error_status, export_response
from spendstream.project_mappings import RuleSet

log = logging.getLogger(__name__)

router = APIRouter(tags=["opentelemetry"])

PATH = "/otlp/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
CLIENT_COST_HEADER = "x-spendstream-client-cost"
#: bodies above this are decoded and mapped in a worker thread, so the event loop keeps serving
#: other requests meanwhile. OTLP JSON costs ~170 us per span to decode (protobuf's pure-Python
#: json_format): a 5 MB JSON export is about a second of CPU. Protobuf costs a few us per span
#: (~470 bytes each): a 1 MiB export is ~2,000 spans, tens of ms, about what the event API takes
#: for its largest bodies, which it validates inline too. Below these sizes the hand-off to a
#: thread costs more than it saves (GIL hand-offs between the loop and the worker on every
#: 512-span export: the OTLP/events throughput ratio went from 0.12 to 0.40 without it).
INLINE_BYTES = {JSON: 64 * 1024, PROTOBUF: 1024 * 1024}
#: reasons quoted in a partial-success message (the count covers all)
MAX_REASONS = 5


def _answer(status: int, body: bytes, as_json: bool, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type=JSON if as_json else PROTOBUF, headers=headers)


def _error(exc: GatewayError, as_json: bool) -> Response:
    status, body, header_pairs = to_http(exc)
    extra = {"error": body["error"]}
    if "field" in body:
        extra["field"] = body["field"]
    headers = {k.decode(): v.decode() for k, v in header_pairs}
    return _answer(status, error_status(status, body["message"], as_json, extra), as_json, headers)


def map_and_validate(
    body: bytes,
    as_json: bool,
    client_cost: bool,
    max_spans: int,
    rules: RuleSet,
    default_project: str,
    ctx: logic.RequestContext | None = None,
) -> tuple[MappedExport, logic.Validated]:
    """Decode, map and validate one export (ingest_gateway/otlp_events.py); BodyError 400/413.
    OTLP JSON is decoded with ``ExportTraceServiceRequest`` and goes on as its protobuf encoding."""
    try:
        request = None
        if as_json:
            request = decode_json(body)
            body = request.SerializeToString()
        return otlp_events.map_and_validate(
            body,
            client_cost=client_cost,
            max_spans=max_spans,
            rules=rules,
            default_project=default_project,
            ctx=ctx or logic.RequestContext.now(),
            request=request,
        )
    except OtlpDecodeError as exc:
        raise BodyError(400, "bad_otlp", exc.message, exc.field) from None


@router.post(
    PATH,
    summary="OTLP/HTTP trace export (OpenTelemetry GenAI spans -> usage events)",
    description=__doc__,
    responses={
        200: {"description": "ExportTraceServiceResponse (partial_success when spans were rejected)"},
        400: {}, 401: {}, 403: {}, 413: {}, 415: {},
        429: {"description": "retry after Retry-After"}, 503: {"description": "retry after Retry-After"},
    },
)  # fmt: skip
async def export_traces(request: Request) -> Response:
    content_type = logic.media_type(request.headers.get("content-type"))
    as_json = content_type == JSON
    metrics: GatewayMetrics = request.app.state.metrics
    try:
        response = await _export(request, content_type, as_json)
    except GatewayError as exc:
        response = _error(exc, as_json)
    except ClientGone:
        return Response(status_code=499)
    metrics.otlp_requests.labels(str(response.status_code)).inc()
    return response


async def _export(request: Request, content_type: str, as_json: bool) -> Response:
    state = request.app.state
    settings = request.app.ingest_settings
    principal = await authenticate(
        state.keys, request.headers.get("authorization"), request.headers.get("x-api-key"), "ingest"
    )
    if content_type not in (PROTOBUF, JSON):
        raise BodyError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type or '(none)'!r} is not supported: send {PROTOBUF} or {JSON} (OTLP/HTTP)",
            "content-type",
        )
    max_bytes = settings.gateway.max_body_bytes
    body = await read_body(request.receive, request.headers.get("content-length"), max_bytes)
    encoding = request.headers.get("content-encoding")
    if encoding is not None:
        body = logic.decode_content(body, encoding, max_bytes)
    client_cost = request.headers.get(CLIENT_COST_HEADER, "").strip().lower() in ("1", "true", "yes")
    max_spans = settings.gateway.max_events_per_request
    inline = len(body) <= INLINE_BYTES[content_type]
    # an inline export is decoded, mapped and validated with the cyclic GC paused: it makes a few
    # GC-tracked objects per span (message wrappers, attribute dicts) and no cycles, all gone by the
    # end (the validated events are untracked msgspec structs), so the collections it would trigger
    # only walk and promote short-lived objects: 25.7 -> 22.7 us of gateway CPU per span (bench_otlp,
    # medians of 3 under load). Bounded: at most INLINE_BYTES of body, and re-enabled in any case.
    rules = state.project_rules.for_tenant(principal.tenant)
    default_project = settings.otel.default_project
    ctx = logic.RequestContext.now()
    paused = inline and gc.isenabled()
    if paused:
        gc.disable()
    try:
        if inline:
            mapped, result = map_and_validate(body, as_json, client_cost, max_spans, rules, default_project, ctx)
        else:  # the event loop keeps serving other requests meanwhile
            mapped, result = await asyncio.to_thread(
                map_and_validate, body, as_json, client_cost, max_spans, rules, default_project, ctx
            )
    finally:
        if paused:
            gc.enable()
    metrics: GatewayMetrics = state.metrics
    metrics.otlp_spans.labels("received").inc(mapped.spans)
    metrics.otlp_spans.labels("not_model_call").inc(mapped.ignored)

    reasons = [reason for _, reason in mapped.rejected]
    for r in result.rejected:
        first = r["errors"][0]
        reasons.append(f"{r['event_id']}: {first['field']}: {first['message']}")
    for reason in logic.rejection_reasons(result.rejected):
        metrics.events_rejected.labels(reason).inc()
    if result.accepted:
        publisher: Publisher = state.publisher
        try:
            await publisher.publish(principal.tenant, ctx.received_at_str, result.by_project, result.accepted)
        except GatewayError as exc:  # 503/429: the exporter retries the whole export
            metrics.events_rejected.labels(exc.code).inc(result.accepted)
            raise
        metrics.events_accepted.inc(result.accepted)
        metrics.otlp_spans.labels("event").inc(result.accepted)
    rejected = len(reasons)
    metrics.otlp_spans.labels("rejected").inc(rejected)
    message = ""
    if rejected:
        shown = "; ".join(reasons[:MAX_REASONS])
        more = f" (and {rejected - MAX_REASONS} more)" if rejected > MAX_REASONS else ""
        message = f"{rejected} model-call span(s) rejected: {shown}{more}"
    return _answer(200, export_response(rejected, message, as_json), as_json)
