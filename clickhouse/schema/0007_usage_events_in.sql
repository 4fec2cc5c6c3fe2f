-- usage_events_in: the sink's way into usage_events. One row per usage.priced record, in the
-- record's own JSON (the sink inserts FORMAT JSONEachRow with the record's value, prefixed with
-- its Kafka partition and offset), so ClickHouse parses the events instead of the Python sink.
-- Null engine: nothing is stored here; usage_events_in_mv ARRAY JOINs each record's events into
-- usage_events, whose own views then fill the aggregates. Element names follow the priced event
-- (spendstream/contracts.py); absent elements take their type's default, as the sink's insert
-- sets input_format_json_defaults_for_missing_elements_in_named_tuple (ClickHouse's default).
-- Exactly once: an insert carries insert_deduplication_token and
-- deduplicate_blocks_in_dependent_materialized_views = 1, so a retried insert is a no-op in
-- usage_events and, through its views, in every aggregate (each target has the dedup window).
CREATE TABLE IF NOT EXISTS {db}.usage_events_in
(
    partition UInt32,
    offset UInt64,
    tenant String,
    project String,
    received_at DateTime64(3, 'UTC'),
    src Tuple(partition UInt32, offset UInt64),
    events Array(Tuple(
        event_id String,
        timestamp DateTime64(3, 'UTC'),
        agent String,
        user String,
        session_id String,
        operation String,
        tags Map(String, String),
        provider String,
        model String,
        input_tokens UInt64,
        output_tokens UInt64,
        cache_read_tokens UInt64,
        cache_write_tokens UInt64,
        cache_write_1h_tokens UInt64,
        reasoning_tokens UInt64,
        input_audio_tokens UInt64,
        output_audio_tokens UInt64,
        cost_nanos Int64,
        cost Tuple(input Int64, output Int64, cache_read Int64, cache_write Int64, reasoning Int64,
                   input_audio Int64, output_audio Int64, request Int64),
        price_id String,
        pricing_status String,
        price_source String,
        status String,
        latency_ms Nullable(UInt64)))
)
ENGINE = Null;

-- Defaults of absent event fields as the contract states them: agent 'default', status 'ok'.
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_events_in_mv TO {db}.usage_events AS
SELECT
    tenant,
    project,
    if(e.agent = '', 'default', e.agent) AS agent,
    e.user AS user,
    e.session_id AS session_id,
    e.operation AS operation,
    e.tags AS tags,
    e.provider AS provider,
    e.model AS model,
    e.input_tokens AS input_tokens,
    e.output_tokens AS output_tokens,
    e.cache_read_tokens AS cache_read_tokens,
    e.cache_write_tokens AS cache_write_tokens,
    e.cache_write_1h_tokens AS cache_write_1h_tokens,
    e.reasoning_tokens AS reasoning_tokens,
    e.input_audio_tokens AS input_audio_tokens,
    e.output_audio_tokens AS output_audio_tokens,
    e.cost_nanos AS cost_nanos,
    e.cost.input AS cost_input_nanos,
    e.cost.output AS cost_output_nanos,
    e.cost.cache_read AS cost_cache_read_nanos,
    e.cost.cache_write AS cost_cache_write_nanos,
    e.cost.reasoning AS cost_reasoning_nanos,
    e.cost.input_audio AS cost_input_audio_nanos,
    e.cost.output_audio AS cost_output_audio_nanos,
    e.cost.request AS cost_request_nanos,
    e.price_id AS price_id,
    e.pricing_status AS pricing_status,
    e.price_source AS price_source,
    if(e.status = '', 'ok', e.status) AS status,
    e.latency_ms AS latency_ms,
    e.event_id AS event_id,
    e.timestamp AS timestamp,
    received_at,
    partition,
    offset,
    src.partition AS src_partition,
    src.offset AS src_offset
FROM {db}.usage_events_in
ARRAY JOIN events AS e;
