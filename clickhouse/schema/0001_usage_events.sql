-- Spendstream ClickHouse schema. `{db}` is the database (settings.clickhouse.database,
-- "spendstream" by default): the migrator substitutes it, nothing else. Files are forward-only
-- and every statement is re-runnable (IF NOT EXISTS), so a file interrupted half-way can be
-- applied again. Documentation for analysts: clickhouse/README.md.

-- usage_events: one row per priced event, written by the sink from spendstream.usage.priced.
-- ORDER BY (tenant, timestamp, event_id): every query is tenant-scoped and time-bounded, and the
-- raw-events API pages through (timestamp, event_id) in key order. PARTITION BY month of event
-- time, so backfills land in their own month and TTL drops whole parts. The TTL itself is not
-- written here: the migrator sets it from settings.clickhouse.usage_ttl_days (0 = keep forever).
-- non_replicated_deduplication_window makes a batch re-sent with the same
-- insert_deduplication_token a no-op (here and, with the window on every MV target, in the MVs).
CREATE TABLE IF NOT EXISTS {db}.usage_events
(
    tenant LowCardinality(String),
    project LowCardinality(String),
    agent LowCardinality(String),
    user String,
    session_id String,
    operation LowCardinality(String),
    tags Map(String, String),
    provider LowCardinality(String),
    model LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    cache_write_1h_tokens UInt64,
    reasoning_tokens UInt64,
    input_audio_tokens UInt64,
    output_audio_tokens UInt64,
    cost_nanos Int64,
    cost_input_nanos Int64,
    cost_output_nanos Int64,
    cost_cache_read_nanos Int64,
    cost_cache_write_nanos Int64,
    cost_reasoning_nanos Int64,
    cost_input_audio_nanos Int64,
    cost_output_audio_nanos Int64,
    cost_request_nanos Int64,
    price_id LowCardinality(String),
    pricing_status LowCardinality(String),
    price_source LowCardinality(String),
    status LowCardinality(String),
    latency_ms Nullable(UInt64),
    event_id String,
    timestamp DateTime64(3, 'UTC'),
    received_at DateTime64(3, 'UTC'),
    partition UInt32,
    offset UInt64,
    src_partition UInt32,
    src_offset UInt64,
    INDEX event_id_bloom event_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (tenant, timestamp, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
