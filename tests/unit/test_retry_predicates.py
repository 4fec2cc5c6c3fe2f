"""The one error classification every stage uses (stream_processors/runtime/retry.py): transient errors are
retried until they heal, data errors never are (the record is dead-lettered), anything else is a
bug. retry_forever takes a predicate: a stage passing an exception tuple crashed (TypeError) on the
first ClickHouse outage instead of retrying. Drive the real retry loop with errors that heal and
with one that never will."""

import asyncio

import orjson
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    DataError,
    OperationalError,
)

from stream_processors.notify.notifier import _store_error_is_retryable
from stream_processors.runtime.retry import (
    CLICKHOUSE_DATA_ERRORS,
    RETRIES,
    data_error_label,
    is_data_error,
    is_transient,
    reason_of,
    retry_forever,
)


def clickhouse_error(code: int, name: str) -> DatabaseError:
    """What clickhouse-connect raises for a server exception (code from X-ClickHouse-Exception-Code)."""
    return DatabaseError(f"Received ClickHouse exception, code: {code}, server response: Code: {code}. ({name})",
                         code=code, name=name)  # fmt: skip


def unencodable() -> orjson.JSONEncodeError:
    try:
        orjson.dumps({"cost_nanos": 2**64})
    except orjson.JSONEncodeError as exc:
        return exc
    raise AssertionError("orjson encoded an integer past 64 bits")


TRANSIENT = [
    OperationalError("HTTP driver connection refused"),  # clickhouse-connect: no server, no code
    clickhouse_error(252, "TOO_MANY_PARTS"),
    clickhouse_error(241, "MEMORY_LIMIT_EXCEEDED"),
    clickhouse_error(159, "TIMEOUT_EXCEEDED"),
    clickhouse_error(60, "UNKNOWN_TABLE"),  # not migrated yet: an operator's fix, no record's fault
    ConnectionRefusedError("refused"),
    TimeoutError("timed out"),
    KafkaConnectionError(),
    KafkaTimeoutError(),
]
DATA = [
    clickhouse_error(407, "DECIMAL_OVERFLOW"),
    clickhouse_error(27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED"),
    clickhouse_error(53, "TYPE_MISMATCH"),
    clickhouse_error(321, "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"),
    DataError("Unable to create native array for column `percent_used`: error"),  # client-side serialisation
    MessageSizeTooLargeError(),
    RecordTooLargeError(),
    unencodable(),
]
BUGS = [ValueError("a bug, not an outage"), KeyError("x"), AssertionError("no")]


@pytest.mark.parametrize("exc", TRANSIENT, ids=repr)
def test_transient_errors_are_retried(exc: BaseException) -> None:
    assert is_transient(exc) and not is_data_error(exc)


@pytest.mark.parametrize("exc", DATA, ids=repr)
def test_data_errors_are_never_retried(exc: BaseException) -> None:
    assert is_data_error(exc) and not is_transient(exc)


@pytest.mark.parametrize("exc", BUGS, ids=repr)
def test_anything_else_is_neither(exc: BaseException) -> None:
    assert not is_transient(exc) and not is_data_error(exc)


def test_labels_and_reasons_are_bounded() -> None:
    assert data_error_label(DATA[0]) == "DECIMAL_OVERFLOW"
    assert data_error_label(DATA[4]) == "clickhouse_client_data"
    assert data_error_label(MessageSizeTooLargeError()) == "too_large"
    assert data_error_label(unencodable()) == "unencodable"
    assert set(CLICKHOUSE_DATA_ERRORS.values()) >= {6, 27, 53, 70, 72, 321, 407}
    reason = reason_of(clickhouse_error(27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED " + "x" * 5000), "refused: ")
    assert reason.startswith("refused: DatabaseError: Received ClickHouse exception, code: 27") and len(reason) == 1000


def test_store_errors_are_retried_until_they_heal():
    calls = []

    async def flaky():
        async for attempt in retry_forever("test", "store", _store_error_is_retryable, max_wait_s=0.01):
            with attempt:
                calls.append(1)
                if len(calls) < 3:
                    raise OperationalError("ClickHouse down")
        return len(calls)

    assert asyncio.run(flaky()) == 3
    assert _store_error_is_retryable(OSError("refused"))
    assert not _store_error_is_retryable(ValueError("a bug, not an outage"))


def test_the_default_loop_retries_a_busy_clickhouse_but_gives_a_data_error_back_at_once():
    attempts: list[int] = []
    before = RETRIES.labels("test", "insert")._value.get()

    async def write(errors: list[BaseException]) -> None:
        async for attempt in retry_forever("test", "insert", max_wait_s=0.01):
            with attempt:
                attempts.append(1)
                if errors:
                    raise errors.pop(0)

    asyncio.run(write([clickhouse_error(252, "TOO_MANY_PARTS"), OperationalError("reset")]))
    assert len(attempts) == 3 and RETRIES.labels("test", "insert")._value.get() == before + 2
    attempts.clear()
    with pytest.raises(DatabaseError, match="DECIMAL_OVERFLOW"):
        asyncio.run(write([clickhouse_error(407, "DECIMAL_OVERFLOW")]))
    assert len(attempts) == 1  # no second try of a write that cannot succeed
