"""How a stage tells a passing fault from poison, and retries the faults.

Every error a stage meets on its IO is one of three kinds, decided here and nowhere else:

transient (:func:`is_transient`): the other side is down, slow or busy. Retried with backoff until
    it passes (:func:`retry_forever`); meanwhile the stage stalls and commits nothing, and skips
    nothing. Kafka errors, except a record too large for the broker; ``OSError`` (refused or reset
    connections, timeouts); every ClickHouse error that does not blame the data: connection and
    HTTP failures (clickhouse-connect's ``OperationalError``), TOO_MANY_PARTS, MEMORY_LIMIT_EXCEEDED,
    TIMEOUT_EXCEEDED, TABLE_IS_READ_ONLY, and also an UNKNOWN_TABLE before ``spendstream migrate``
    ran: an operator fixes those, and skipping the records meanwhile would lose them.
data (:func:`is_data_error`): the record itself is refused, so the same write fails the same way
    forever. Never retried: the stage dead-letters the record (``spendstream.usage.dlq``, with
    the reason) or, for an alert in notify, records a refused delivery, counts it in
    ``spendstream_stage_poison_records_total{stage,reason}`` and goes on. ClickHouse refusing a
    value (:data:`CLICKHOUSE_DATA_ERRORS`: cannot parse, type mismatch, out of range, decimal
    overflow, ...); clickhouse-connect's ``DataError`` (it could not serialise a value into its
    column, e.g. 2**63 into Int64 or a Decimal(18, 4) overflow, before anything was sent); a
    record too large for Kafka; a value orjson cannot encode (an integer beyond 64 bits).
anything else: a bug. It propagates and stops the worker; the restart replays its uncommitted input.
    Except where a stage runs its pure code over one record's hostile content: there the
    :data:`CONTENT_ERRORS` that content can provoke dead-letter that record (each stage says where).

Webhook and e-mail answers are the notify stage's own business (``spendstream/alerting/retries.classify_http``:
timeouts, HTTP 5xx and 429 are retried until the retry horizon, other answers are final); its
ClickHouse IO follows the rules above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from clickhouse_connect.driver.exceptions import (
    ClickHouseError,
    DatabaseError,
    DataError,
)
from prometheus_client import Counter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)

RETRIES = Counter(
    "spendstream_stage_io_retries_total", "Writes or reads retried after a transient error", ["stage", "target"]
)
POISON = Counter(
    "spendstream_stage_poison_records_total",
    "Records a stage could not process, encode or store because of their content (dead-lettered, or for "
    "notify recorded as refused deliveries); the stage went on",
    ["stage", "reason"],
)

#: ClickHouse error codes that blame the data (the value cannot be parsed, converted or stored in
#: its column), by name as ``errorCodeToName`` spells them (checked against the embedded engine in
#: tests/integration/test_stage_poison.py)
CLICKHOUSE_DATA_ERRORS: dict[str, int] = {
    "CANNOT_PARSE_TEXT": 6,
    "SIZE_OF_FIXED_STRING_DOESNT_MATCH": 19,
    "CANNOT_PARSE_ESCAPE_SEQUENCE": 25,
    "CANNOT_PARSE_QUOTED_STRING": 26,
    "CANNOT_PARSE_INPUT_ASSERTION_FAILED": 27,
    "CANNOT_PARSE_DATE": 38,
    "CANNOT_PARSE_DATETIME": 41,
    "TYPE_MISMATCH": 53,
    "ARGUMENT_OUT_OF_BOUND": 69,
    "CANNOT_CONVERT_TYPE": 70,
    "CANNOT_PARSE_NUMBER": 72,
    "INCORRECT_DATA": 117,
    "CANNOT_INSERT_VALUE_OF_DIFFERENT_SIZE_INTO_TUPLE": 120,
    "TOO_LARGE_ARRAY_SIZE": 128,
    "CANNOT_READ_ARRAY_FROM_TEXT": 130,
    "TOO_LARGE_STRING_SIZE": 131,
    "SIZES_OF_ARRAYS_DONT_MATCH": 190,
    "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE": 321,
    "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN": 349,
    "CANNOT_PARSE_UUID": 376,
    "DECIMAL_OVERFLOW": 407,
    "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING": 441,
    "CANNOT_PARSE_BOOL": 467,
    "CANNOT_READ_MAP_FROM_TEXT": 563,
    "UNKNOWN_ELEMENT_OF_ENUM": 691,
}
_DATA_ERROR_NAMES = {code: name for name, code in CLICKHOUSE_DATA_ERRORS.items()}
#: what a record's content can make pure code raise (orjson's errors are ValueError/TypeError)
CONTENT_ERRORS = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError)
#: the longest reason a dead letter carries: ClickHouse quotes the offending input in its messages
MAX_REASON_CHARS = 1_000


def is_data_error(exc: BaseException) -> bool:
    """The record's content is refused: retrying the same write cannot succeed."""
    if isinstance(exc, DatabaseError):
        return isinstance(exc, DataError) or getattr(exc, "code", None) in _DATA_ERROR_NAMES
    return isinstance(exc, (MessageSizeTooLargeError, RecordTooLargeError, orjson.JSONEncodeError, OverflowError))


def is_transient(exc: BaseException) -> bool:
    """The other side failed for now: retry the same write until it passes."""
    return isinstance(exc, (KafkaError, ClickHouseError, OSError)) and not is_data_error(exc)


def data_error_label(exc: BaseException) -> str:
    """A short, bounded label for the poison metric: the ClickHouse error name, or the kind."""
    if isinstance(exc, DataError):
        return "clickhouse_client_data"
    code = getattr(exc, "code", None)
    if isinstance(exc, DatabaseError) and code in _DATA_ERROR_NAMES:
        return _DATA_ERROR_NAMES[code]
    if isinstance(exc, (MessageSizeTooLargeError, RecordTooLargeError)):
        return "too_large"
    return "unencodable"


def reason_of(exc: BaseException, prefix: str = "") -> str:
    """The dead letter's reason for ``exc`` (bounded: a ClickHouse message can quote much input)."""
    cause = exc.__cause__
    text = f"{prefix}{type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def retry_forever(
    stage: str, target: str, retryable: Callable[[BaseException], bool] = is_transient, max_wait_s: float = 10.0
) -> AsyncRetrying:
    """``async for attempt in retry_forever(...): with attempt: ...`` with exponential backoff,
    logging and counting every failed attempt. Errors for which ``retryable`` is false propagate
    (by default everything but :func:`is_transient` errors: data errors are the caller's to
    dead-letter, bugs stop the worker)."""

    def before_sleep(state: RetryCallState) -> None:
        RETRIES.labels(stage, target).inc()
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: %s failed (attempt %d: %r); retrying in %.1fs",
            stage, target, state.attempt_number, exc, state.next_action.sleep if state.next_action else 0,
        )  # fmt: skip

    return AsyncRetrying(
        retry=retry_if_exception(retryable),
        wait=wait_exponential_jitter(initial=0.1, max=max_wait_s),
        before_sleep=before_sleep,
        reraise=True,
    )
