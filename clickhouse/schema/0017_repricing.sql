-- Re-pricing (spendstream/repricing, POST /v1/pricing/reprice): stored costs follow a price fixed
-- later, in usage_events and in every aggregate, without ALTER ... UPDATE over months of data.
--
-- A re-priced event gets two correction rows in usage_events, inserted like the sink's batches
-- (insert_deduplication_token per batch, deduplicate_blocks_in_dependent_materialized_views = 1),
-- so every view below follows and a retried batch is a no-op everywhere:
--   correction_kind = 'reversal': the event's current costs negated (and its current price_id,
--                                 pricing_status, price_source),
--   correction_kind = 'repriced': the new costs and pricing fields.
-- Both copy the event's attribution, timestamp, event_id and Kafka coordinates (so ingest_progress,
-- a max over src_offset, is unchanged), carry zero tokens and a NULL latency, and name the job in
-- correction_id. An original row has correction_kind = ''. So sums of money and tokens over
-- usage_events need no filter; counting events does (correction_kind = ''). The two rows of an
-- event are in the same insert, hence the same part of every table: a reader sees the old cost
-- or the new one, never both. clickhouse/README.md, "Re-pricing", says how to read the raw table.
--
-- The views count only original rows as calls and errors, and `unpriced` (toUInt64 of a signed sum) / unpriced_models.events
-- take -1 for a reversal of an unpriced event (the counts are UInt64: a part may hold the value
-- modulo 2^64, which sum() reads back exactly, as every reader of these tables must anyway).
-- Tokens and latency need no change: correction rows carry none. New columns take their DEFAULT
-- for rows the sink writes; usage_events_in_mv names them so its columns still match the table.
-- Every changed view is reloaded (DETACH + ATTACH) right after, as 0014 explains. Re-runnable.

ALTER TABLE {db}.usage_events
    ADD COLUMN IF NOT EXISTS correction_id String DEFAULT '',
    ADD COLUMN IF NOT EXISTS correction_kind LowCardinality(String) DEFAULT '';

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
    src.offset AS src_offset,
    '' AS correction_id,
    '' AS correction_kind
FROM {db}.usage_events_in
ARRAY JOIN events AS e;

DETACH TABLE IF EXISTS {db}.usage_events_in_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_events_in_mv;

ALTER TABLE {db}.usage_minute_mv MODIFY QUERY
SELECT
    tenant,
    toStartOfMinute(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    countIf(correction_kind = '') AS calls,
    countIf(status = 'error' AND correction_kind = '') AS errors,
    toUInt64(sumIf(if(correction_kind = 'reversal', -1, 1), pricing_status IN ('unknown_model', 'cost_over_cap'))) AS unpriced,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(toInt128(cost_nanos)) AS cost_nanos,
    sum(toInt128(cost_input_nanos)) AS cost_input_nanos,
    sum(toInt128(cost_output_nanos)) AS cost_output_nanos,
    sum(toInt128(cost_cache_read_nanos)) AS cost_cache_read_nanos,
    sum(toInt128(cost_cache_write_nanos)) AS cost_cache_write_nanos,
    sum(toInt128(cost_reasoning_nanos)) AS cost_reasoning_nanos,
    sum(toInt128(cost_input_audio_nanos)) AS cost_input_audio_nanos,
    sum(toInt128(cost_output_audio_nanos)) AS cost_output_audio_nanos,
    sum(toInt128(cost_request_nanos)) AS cost_request_nanos,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    count(latency_ms) AS latency_count,
    uniqStateIf(user, user != '') AS users,
    uniqStateIf(session_id, session_id != '') AS sessions
FROM {db}.usage_events
GROUP BY tenant, bucket, project, agent, provider, model;

DETACH TABLE IF EXISTS {db}.usage_minute_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_minute_mv;

ALTER TABLE {db}.usage_hourly_mv MODIFY QUERY
SELECT
    tenant,
    toStartOfHour(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    user,
    countIf(correction_kind = '') AS calls,
    countIf(status = 'error' AND correction_kind = '') AS errors,
    toUInt64(sumIf(if(correction_kind = 'reversal', -1, 1), pricing_status IN ('unknown_model', 'cost_over_cap'))) AS unpriced,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(toInt128(cost_nanos)) AS cost_nanos,
    sum(toInt128(cost_input_nanos)) AS cost_input_nanos,
    sum(toInt128(cost_output_nanos)) AS cost_output_nanos,
    sum(toInt128(cost_cache_read_nanos)) AS cost_cache_read_nanos,
    sum(toInt128(cost_cache_write_nanos)) AS cost_cache_write_nanos,
    sum(toInt128(cost_reasoning_nanos)) AS cost_reasoning_nanos,
    sum(toInt128(cost_input_audio_nanos)) AS cost_input_audio_nanos,
    sum(toInt128(cost_output_audio_nanos)) AS cost_output_audio_nanos,
    sum(toInt128(cost_request_nanos)) AS cost_request_nanos,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    count(latency_ms) AS latency_count,
    uniqStateIf(user, user != '') AS users,
    uniqStateIf(session_id, session_id != '') AS sessions
FROM {db}.usage_events
GROUP BY tenant, bucket, project, agent, provider, model, user;

DETACH TABLE IF EXISTS {db}.usage_hourly_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_hourly_mv;

ALTER TABLE {db}.usage_daily_mv MODIFY QUERY
SELECT
    tenant,
    toStartOfDay(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    user,
    countIf(correction_kind = '') AS calls,
    countIf(status = 'error' AND correction_kind = '') AS errors,
    toUInt64(sumIf(if(correction_kind = 'reversal', -1, 1), pricing_status IN ('unknown_model', 'cost_over_cap'))) AS unpriced,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(toInt128(cost_nanos)) AS cost_nanos,
    sum(toInt128(cost_input_nanos)) AS cost_input_nanos,
    sum(toInt128(cost_output_nanos)) AS cost_output_nanos,
    sum(toInt128(cost_cache_read_nanos)) AS cost_cache_read_nanos,
    sum(toInt128(cost_cache_write_nanos)) AS cost_cache_write_nanos,
    sum(toInt128(cost_reasoning_nanos)) AS cost_reasoning_nanos,
    sum(toInt128(cost_input_audio_nanos)) AS cost_input_audio_nanos,
    sum(toInt128(cost_output_audio_nanos)) AS cost_output_audio_nanos,
    sum(toInt128(cost_request_nanos)) AS cost_request_nanos,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    count(latency_ms) AS latency_count,
    uniqStateIf(user, user != '') AS users,
    uniqStateIf(session_id, session_id != '') AS sessions
FROM {db}.usage_events
GROUP BY tenant, bucket, project, agent, provider, model, user;

DETACH TABLE IF EXISTS {db}.usage_daily_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_daily_mv;

ALTER TABLE {db}.usage_tags_daily_mv MODIFY QUERY
SELECT
    tenant,
    tag_key,
    tag_value,
    toStartOfDay(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    countIf(correction_kind = '') AS calls,
    countIf(status = 'error' AND correction_kind = '') AS errors,
    toUInt64(sumIf(if(correction_kind = 'reversal', -1, 1), pricing_status IN ('unknown_model', 'cost_over_cap'))) AS unpriced,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(toInt128(cost_nanos)) AS cost_nanos,
    sum(toInt128(cost_input_nanos)) AS cost_input_nanos,
    sum(toInt128(cost_output_nanos)) AS cost_output_nanos,
    sum(toInt128(cost_cache_read_nanos)) AS cost_cache_read_nanos,
    sum(toInt128(cost_cache_write_nanos)) AS cost_cache_write_nanos,
    sum(toInt128(cost_reasoning_nanos)) AS cost_reasoning_nanos,
    sum(toInt128(cost_input_audio_nanos)) AS cost_input_audio_nanos,
    sum(toInt128(cost_output_audio_nanos)) AS cost_output_audio_nanos,
    sum(toInt128(cost_request_nanos)) AS cost_request_nanos,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    count(latency_ms) AS latency_count,
    uniqStateIf(user, user != '') AS users,
    uniqStateIf(session_id, session_id != '') AS sessions
FROM {db}.usage_events
ARRAY JOIN mapKeys(tags) AS tag_key, mapValues(tags) AS tag_value
GROUP BY tenant, tag_key, tag_value, bucket, project, agent, provider, model;

DETACH TABLE IF EXISTS {db}.usage_tags_daily_mv;
ATTACH TABLE IF NOT EXISTS {db}.usage_tags_daily_mv;

ALTER TABLE {db}.unpriced_models_mv MODIFY QUERY
SELECT
    tenant,
    provider,
    model,
    sum(if(correction_kind = 'reversal', -1, 1)) AS events,
    min(timestamp) AS first_seen,
    max(timestamp) AS last_seen
FROM {db}.usage_events
WHERE pricing_status = 'unknown_model'
GROUP BY tenant, provider, model;

DETACH TABLE IF EXISTS {db}.unpriced_models_mv;
ATTACH TABLE IF NOT EXISTS {db}.unpriced_models_mv;

-- the analysts' view of usage_events (0006) with the new columns
CREATE OR REPLACE VIEW {db}_tenant.usage_events AS
SELECT * FROM {db}.usage_events
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

-- reprice_jobs: one row per re-pricing job, rewritten (higher version) as it progresses; read with
-- FINAL. status: running | done | failed. The cursor (cursor_ts, cursor_event_id) is the last
-- event of the scope handled, so a job restarted after a crash resumes there; totals are nano-USD
-- of the events changed so far. scope and diff are JSON. ORDER BY (tenant, id): the replacing key,
-- jobs are listed per tenant. Not partitioned: few rows.
CREATE TABLE IF NOT EXISTS {db}.reprice_jobs
(
    tenant LowCardinality(String),
    id String,
    status LowCardinality(String),
    actor String,
    reason String,
    scope String,
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    cursor_ts DateTime64(3, 'UTC'),
    cursor_event_id String,
    batches UInt64,
    events_scanned UInt64,
    events_changed UInt64,
    old_nanos Int128,
    new_nanos Int128,
    diff String,
    error String,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant, id);

-- pricing_audit: append-only trail of re-pricings: who (actor: the API key id, or 'auto' for a
-- trigger), when, why, the scope, and the old and new totals of the events changed. One row when a
-- job starts applying and one when it ends (status). ORDER BY (tenant, at, job_id): listed per
-- tenant, newest last. Not partitioned: rare.
CREATE TABLE IF NOT EXISTS {db}.pricing_audit
(
    tenant LowCardinality(String),
    at DateTime64(3, 'UTC'),
    job_id String,
    status LowCardinality(String),
    actor String,
    reason String,
    scope String,
    events_changed UInt64,
    old_nanos Int128,
    new_nanos Int128
)
ENGINE = MergeTree
ORDER BY (tenant, at, job_id);
