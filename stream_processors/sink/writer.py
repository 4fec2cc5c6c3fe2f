"""ClickHouse side of the sink: blocking calls, run by the agent in a worker thread.

Every insert carries its ``insert_deduplication_token`` and
``deduplicate_blocks_in_dependent_materialized_views=1``: with ``non_replicated_deduplication_window``
on usage_events and on every MV target (clickhouse/schema), an insert re-sent after an error is a
no-op in the table and in every aggregate.
"""

from __future__ import annotations

import struct
from typing import Any

from clickhouse_connect.driver.client import Client

from spendstream.clickhouse import get_client
from spendstream.settings import Settings
from stream_processors.sink.logic import COLUMNS, Insert, TimestampParser, to_columns

TABLE = "usage_events"

#: raised while encoding a batch on our side: the data, not ClickHouse, is at fault, so a retry
#: would fail forever (see UsageEventsWriter.insert)
ENCODING_ERRORS: tuple[type[BaseException], ...] = (TypeError, ValueError, OverflowError, KeyError, struct.error)


class UsageEventsWriter:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._client: Client | None = None
        self._column_types: list[Any] | None = None
        self._parse_ts = TimestampParser()

    def _connected(self) -> Client:
        if self._client is None:
            self._client = get_client(self._settings)
        if self._column_types is None:
            context = self._client.create_insert_context(TABLE, list(COLUMNS), column_oriented=True)
            self._column_types = list(context.column_types)
        return self._client

    def load_watermarks(self, src_partitions: list[int]) -> dict[int, int]:
        """Highest stored ``src_offset`` per usage.raw partition (absent: nothing stored yet)."""
        result = self._connected().query(
            "SELECT src_partition, max(max_src_offset) FROM ingest_progress"
            " WHERE src_partition IN {partitions:Array(UInt32)} GROUP BY src_partition",
            parameters={"partitions": src_partitions},
        )
        return {int(p): int(o) for p, o in result.result_rows}

    def encode(self, insert: Insert) -> list[list[Any]]:
        """Columns for ``insert``; raises one of :data:`ENCODING_ERRORS` for data it cannot store."""
        return to_columns(insert.records, self._parse_ts)

    def insert(self, insert: Insert, columns: list[list[Any]]) -> None:
        """Write one insert as ONE Native block, so ClickHouse stores all of it or nothing: with
        several blocks a crash between them could store part of a record, and the src watermark
        would then drop the rest of that record on replay."""
        client = self._connected()
        context = client.create_insert_context(
            TABLE,
            list(COLUMNS),
            column_types=self._column_types,
            column_oriented=True,
            settings={
                "insert_deduplicate": 1,
                "insert_deduplication_token": insert.token,
                "deduplicate_blocks_in_dependent_materialized_views": 1,
            },
        )
        context.req_block_size = max(1, len(columns[0]))
        context.data = columns
        client.data_insert(context)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
