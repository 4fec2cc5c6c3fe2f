"""retry_forever takes a predicate: a stage passing an exception tuple crashed (TypeError) on the first
ClickHouse outage instead of retrying. Drive the real retry loop with a store error that heals."""
import asyncio

from clickhouse_connect.driver.exceptions import OperationalError

from stream_processors.notify.notifier import _store_error_is_retryable
from stream_processors.retry import retry_forever


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
