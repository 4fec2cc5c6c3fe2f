-- Issue 19: session fields in the event contract, and the project mapping rules.
--
-- session_label (string <= 256, e.g. "peakpaws-safety-review") and session_type ("main",
-- "subagent", "heartbeat" or any short string) are optional event fields: stored on every
-- usage_events row ('' when absent), filterable and groupable in the analytics API (read from
-- usage_events; the aggregates do not carry them). The new columns follow session_id; existing
-- rows read ''. usage_events_in's event tuple gains the two elements (absent elements take ''),
-- and its view copies them. ALTER ... MODIFY COLUMN on the Null table and MODIFY QUERY on the view
-- keep both in place (no window in which the sink's inserts would find no table). Re-runnable:
-- ADD COLUMN IF NOT EXISTS, and the MODIFY statements set the same definition again.

ALTER TABLE {db}.usage_events
    ADD COLUMN IF NOT EXISTS session_label String AFTER session_id,
    ADD COLUMN IF NOT EXISTS session_type LowCardinality(String) AFTER session_label;

ALTER TABLE {db}.usage_events_in
    MODIFY COLUMN events Array(Tuple(
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
        latency_ms Nullable(UInt64),
        session_label String,
        session_type String));

ALTER TABLE {db}.usage_events_in_mv MODIFY QUERY
SELECT
    tenant,
    project,
    if(e.agent = '', 'default', e.agent) AS agent,
    e.user AS user,
    e.session_id AS session_id,
    e.session_label AS session_label,
    e.session_type AS session_type,
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

-- reloaded as a restart would: after MODIFY QUERY the server that ran it derives other insert-dedup
-- block ids for the view's target than after a restart (see 0014)
DETACH TABLE IF EXISTS {db}.usage_events_in_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_events_in_mv;

-- the analyst view over usage_events (0006) with the new columns
CREATE OR REPLACE VIEW {db}_tenant.usage_events AS
SELECT * FROM {db}.usage_events
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

-- project_mappings: rules assigning a project to events that arrive without one, matched on the
-- event's `field` ('session_label' or 'agent') by the glob `pattern` (case-insensitive), highest
-- `priority` first (spendstream/project_mappings.py). Written by the query API
-- (/v1/project-mappings), read by the gateway every otel.project_mappings_reload_s. Config table
-- as in 0004: a change inserts the whole row with a higher version, `deleted` hides a rule.
-- ORDER BY (tenant, id): the replacing key; rules are read per tenant.
CREATE TABLE IF NOT EXISTS {db}.project_mappings
(
    tenant LowCardinality(String),
    id String,
    pattern String,
    project String,
    priority Int32,
    field LowCardinality(String),
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (tenant, id);

CREATE VIEW IF NOT EXISTS {db}_tenant.project_mappings AS
SELECT * FROM {db}.project_mappings FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);
