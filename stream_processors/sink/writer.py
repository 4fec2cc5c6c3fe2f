"""ClickHouse side of the sink: blocking calls, run by the agent in a worker thread.

Every insert carries its ``insert_deduplication_token`` and
``deduplicate_blocks_in_dependent_materialized_views=1``: with ``non_replicated_deduplication_window``
on usage_events and on every MV target (clickhouse/schema), an insert re-sent after an error is a
no-op in usage_events and in every aggregate, although it goes in through ``usage_events_in``
and its view (verified with a partial failure in tests/integration/test_sink.py).
"""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from spendstream.clickhouse import get_client
from spendstream.settings import Settings
from stream_processors.sink.logic import Insert, PricedRecord, json_rows

TABLE = "usage_events_in"
INSERT_STATEMENT = f"INSERT INTO {TABLE} FORMAT JSONEachRow\n".encode()

#: per-insert settings; the input ones say how the record JSON maps onto usage_events_in
INSERT_SETTINGS = {
    "insert_deduplicate": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    # the envelope's "v" and any field a later contract version adds
    "input_format_skip_unknown_fields": 1,
    "input_format_json_ignore_unknown_keys_in_named_tuple": 1,
    "input_format_json_defaults_for_missing_elements_in_named_tuple": 1,
    "input_format_null_as_default": 1,
    "date_time_input_format": "best_effort",
    # one block per insert: a record is one row, so any block boundary is also a record boundary,
    # but one block keeps ClickHouse's all-or-nothing as close as it gets
    "input_format_parallel_parsing": 0,
}


def insert_records(client: Client, records: list[PricedRecord], token: str) -> None:
    """The sink's insert: ``records`` as one JSONEachRow body into ``usage_events_in``, deduplicated
    by ``token``. The statement leads the body, as clickhouse-connect would put it there itself,
    but by copying a body of up to MAX_INSERT_ROWS rows (~125 MB) once more."""
    client.raw_insert(
        None,
        None,
        json_rows(records, head=INSERT_STATEMENT),
        settings={**INSERT_SETTINGS, "insert_deduplication_token": token},
    )


class UsageEventsWriter:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._client: Client | None = None

    def _connected(self) -> Client:
        if self._client is None:
            self._client = get_client(self._settings)
        return self._client

    def load_watermarks(self, src_partitions: list[int]) -> dict[int, int]:
        """Highest stored ``src_offset`` per usage.raw partition (absent: nothing stored yet)."""
        result = self._connected().query(
            "SELECT src_partition, max(max_src_offset) FROM ingest_progress"
            " WHERE src_partition IN {partitions:Array(UInt32)} GROUP BY src_partition",
            parameters={"partitions": src_partitions},
        )
        return {int(p): int(o) for p, o in result.result_rows}

    def insert(self, insert: Insert) -> None:
        """Write one insert; raises a ClickHouse error, which ``retry.is_data_error`` tells from
        a fault worth retrying."""
        insert_records(self._connected(), insert.records, insert.token)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
