"""OpenTelemetry GenAI spans -> usage events (contract v1). Pure: no Kafka/HTTP/ClickHouse imports.

- ``wire``: OTLP/HTTP trace export bodies (protobuf and OTLP JSON) decoded with the
  ``opentelemetry-proto`` message classes, and the OTLP answers (partial success, error status).
- ``mapping``: which spans are model calls and what usage event each one is, per the GenAI
  semantic conventions (new and deprecated attribute names) and the dialects of the known emitters.

The gateway's ``POST /otlp/v1/traces`` (ingest_gateway/routers/otlp.py) wires them to the key
check, the project mapping rules and the publisher. The attribute table is in docs/otel.md.
"""

from spendstream.otel.mapping import MappedExport, map_export
from spendstream.otel.wire import OtlpDecodeError, decode_json, decode_protobuf

__all__ = ["MappedExport", "OtlpDecodeError", "decode_json", "decode_protobuf", "map_export"]
