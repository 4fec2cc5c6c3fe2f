"""OTLP/HTTP trace export bodies in and answers out, with the ``opentelemetry-proto`` classes.

Requests: ``ExportTraceServiceRequest`` as binary protobuf (``application/x-protobuf``) or as
OTLP JSON (``application/json``). OTLP JSON is protobuf's JSON mapping with two differences the
spec makes (opentelemetry-proto docs/specification.md, "JSON Protobuf Encoding"): trace and span
ids are hex strings, not base64, and enums are integers (which the mapping accepts anyway). The
ids are turned into base64 here and the rest is protobuf's own ``json_format.ParseDict``; unknown
fields are ignored, as the spec requires of receivers.

The mapping reads spans through a second class of the same request, ``TraceView``
(:func:`decode_view`): opentelemetry-proto's own descriptors, copied into a private pool with one
change, ``Span.attributes`` read as ``repeated bytes`` (each attribute's ``KeyValue`` still
encoded), and one more of the same kind, ``Span.status`` as ``bytes``. That is the same wire format (a repeated message field is a repeated length-delimited
field, as ``bytes`` is), so protobuf's C decoder leaves the attributes in C until the mapping asks
for a span's list of encodings, and the mapping decodes each distinct encoding once
(spendstream/otel/mapping.py: a bounded cache), with :data:`KeyValue` itself. The view is laxer
than ``ExportTraceServiceRequest`` in exactly these two places, the attributes and the status of
spans; those are checked when they are decoded (see :func:`attribute_pairs <spendstream.otel.mapping.attribute_pairs>`).

Answers: ``ExportTraceServiceResponse`` (with ``partial_success`` when spans were rejected) and,
for failed requests, a ``google.rpc.Status`` ({code, message}), each in the request's encoding.
The ``googleapis-common-protos`` package that holds ``google.rpc.Status`` is not a dependency: its
two scalar fields are built here as a message class of the same wire shape.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from typing import Any

import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory, proto_builder
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


class OtlpDecodeError(ValueError):
    """The body is not an ``ExportTraceServiceRequest`` in the declared encoding; ``field`` names
    the part at fault (``body`` when it is the whole)."""

    def __init__(self, message: str, field: str = "body"):
        super().__init__(message)
        self.message = message
        self.field = field


# google.rpc.Status: int32 code = 1; string message = 2 (details = 3 is never sent)
_FDP = descriptor_pb2.FieldDescriptorProto
RpcStatus: Any = proto_builder.MakeSimpleProtoClass(
    OrderedDict([("code", _FDP.TYPE_INT32), ("message", _FDP.TYPE_STRING)]),
    full_name="spendstream.otlp.RpcStatus",
)
#: gRPC codes used in the Status bodies, by HTTP status (the OTLP spec only asks for a Status)
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 413: 3, 415: 3, 429: 8, 500: 13, 503: 14}


def decode_protobuf(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError) as exc:
        raise OtlpDecodeError(f"body is not a protobuf ExportTraceServiceRequest: {exc}") from None
    return request


def _trace_view_class() -> Any:
    """``ExportTraceServiceRequest`` with ``Span.attributes`` as ``repeated bytes`` (module doc)."""
    files = []
    for module in (common_pb2, resource_pb2, trace_pb2, trace_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    (span,) = (m for m in files[2].message_type if m.name == "Span")
    (attributes,) = (f for f in span.field if f.name == "attributes")
    assert (attributes.number, attributes.label, attributes.type_name) == (
        9,
        _FDP.LABEL_REPEATED,
        ".opentelemetry.proto.common.v1.KeyValue",
    )
    attributes.type = _FDP.TYPE_BYTES
    attributes.ClearField("type_name")
    (status,) = (f for f in span.field if f.name == "status")
    assert (status.number, status.type_name) == (15, ".opentelemetry.proto.trace.v1.Status")
    status.type = _FDP.TYPE_BYTES  # the same again: a span's status (mostly absent) as its encoding
    status.ClearField("type_name")
    pool = descriptor_pool.DescriptorPool()  # private: the same names as the real classes
    for proto in files:
        pool.Add(proto)
    full_name = ExportTraceServiceRequest.DESCRIPTOR.full_name
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


TraceView: Any = _trace_view_class()
#: what each element of a ``TraceView`` span's ``attributes`` decodes with
KeyValue = common_pb2.KeyValue
#: what a ``TraceView`` span's ``status`` decodes with
Status = trace_pb2.Status


def decode_view(body: bytes) -> Any:
    """A ``TraceView`` of an encoded request (``DecodeError`` when even the view cannot read it)."""
    return TraceView.FromString(body)


def count_spans(request: Any) -> int:
    """Spans in a request or a view of one."""
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


_ID_KEYS = (("traceId", "trace_id"), ("spanId", "span_id"), ("parentSpanId", "parent_span_id"))


def decode_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OtlpDecodeError(f"malformed JSON: {exc}") from None
    if type(data) is not dict:
        raise OtlpDecodeError("body must be a JSON object (an OTLP ExportTraceServiceRequest)")
    for r, resource_spans in enumerate(_items(data, ("resourceSpans", "resource_spans"), "resourceSpans")):
        path = f"resourceSpans[{r}]"
        for s, scope_spans in enumerate(_items(resource_spans, ("scopeSpans", "scope_spans"), path)):
            for n, span in enumerate(_items(scope_spans, ("spans",), f"{path}.scopeSpans[{s}]")):
                span_path = f"{path}.scopeSpans[{s}].spans[{n}]"
                _hex_ids(span, span_path)
                for k, link in enumerate(_items(span, ("links",), span_path)):
                    _hex_ids(link, f"{span_path}.links[{k}]")
    try:
        return json_format.ParseDict(data, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError) as exc:
        raise OtlpDecodeError(f"not an OTLP ExportTraceServiceRequest: {exc}") from None


def _items(parent: Any, keys: tuple[str, ...], path: str) -> list[Any]:
    if type(parent) is not dict:
        raise OtlpDecodeError("must be an object", path)
    for key in keys:
        value = parent.get(key)
        if value is not None:
            if type(value) is not list:
                raise OtlpDecodeError("must be an array", f"{path}.{key}")
            return value
    return []


def _hex_ids(obj: Any, path: str) -> None:
    if type(obj) is not dict:
        raise OtlpDecodeError("must be an object", path)
    for keys in _ID_KEYS:
        for key in keys:
            value = obj.get(key)
            if value is None:
                continue
            if type(value) is not str:
                raise OtlpDecodeError("must be a hex string", f"{path}.{key}")
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpDecodeError(f"not a hex id: {value[:40]!r}", f"{path}.{key}") from None


def hex_id(raw: bytes) -> str:
    return raw.hex()


# ---------------------------------------------------------------- answers


def export_response(rejected: int, message: str, as_json: bool) -> bytes:
    """The success answer; ``partial_success`` only when spans were rejected or there is a message."""
    response = ExportTraceServiceResponse()
    if rejected or message:
        response.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=message))
    if as_json:
        return orjson.dumps(json_format.MessageToDict(response))
    return response.SerializeToString()


def error_status(http_status: int, message: str, as_json: bool, extra: dict[str, str] | None = None) -> bytes:
    """A ``google.rpc.Status`` body for a failed request (JSON: with ``extra`` members, e.g. the field)."""
    code = GRPC_CODES.get(http_status, 2)
    if as_json:
        return orjson.dumps({"code": code, "message": message, **(extra or {})})
    return RpcStatus(code=code, message=message).SerializeToString()
