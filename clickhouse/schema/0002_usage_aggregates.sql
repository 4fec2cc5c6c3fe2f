-- Usage aggregates, kept by materialized views on usage_events. Every grain has the same
-- measures, so a query can move between grains by changing the table name:
--   calls, errors (status = 'error'), unpriced (pricing_status = 'unknown_model'), every token
--   class, cost_nanos and its per-class breakdown, latency_ms_sum / latency_count (events that
--   reported a latency), and uniq states of users and sessions (read with uniqMerge).
-- SummingMergeTree adds up the numeric measures and merges the AggregateFunction states of rows
-- with the same sorting key, so rows are partial sums until merged: always read with sum() /
-- uniqMerge() and GROUP BY. `bucket` is the start of the minute/hour/day in UTC.
-- non_replicated_deduplication_window: a retried insert into usage_events (same
-- insert_deduplication_token, deduplicate_blocks_in_dependent_materialized_views = 1) must be a
-- no-op in each target too, and that needs the window on the target table as well.

-- usage_minute: freshness and short ranges (dashboards, minute/hour timeseries of recent data).
-- No `user` key: users are high-cardinality and would make minute rows as many as events;
-- distinct users are still available from the `users` state. ORDER BY (tenant, bucket, ...):
-- tenant and a time range narrow every query; the rest of the key is the grouping.
-- PARTITION BY month of the bucket, like usage_events.
CREATE TABLE IF NOT EXISTS {db}.usage_minute
(
    tenant LowCardinality(String),
    bucket DateTime64(3, 'UTC'),
    project LowCardinality(String),
    agent LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    calls UInt64,
    errors UInt64,
    unpriced UInt64,
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
    latency_ms_sum UInt64,
    latency_count UInt64,
    users AggregateFunction(uniq, String),
    sessions AggregateFunction(uniq, String)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, bucket, project, agent, provider, model)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_minute_mv TO {db}.usage_minute AS
SELECT
    tenant,
    toStartOfMinute(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    count() AS calls,
    countIf(status = 'error') AS errors,
    countIf(pricing_status = 'unknown_model') AS unpriced,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(cost_nanos) AS cost_nanos,
    sum(cost_input_nanos) AS cost_input_nanos,
    sum(cost_output_nanos) AS cost_output_nanos,
    sum(cost_cache_read_nanos) AS cost_cache_read_nanos,
    sum(cost_cache_write_nanos) AS cost_cache_write_nanos,
    sum(cost_reasoning_nanos) AS cost_reasoning_nanos,
    sum(cost_input_audio_nanos) AS cost_input_audio_nanos,
    sum(cost_output_audio_nanos) AS cost_output_audio_nanos,
    sum(cost_request_nanos) AS cost_request_nanos,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    count(latency_ms) AS latency_count,
    uniqStateIf(user, user != '') AS users,
    uniqStateIf(session_id, session_id != '') AS sessions
FROM {db}.usage_events
GROUP BY tenant, bucket, project, agent, provider, model;

-- usage_hourly: hour buckets (timeseries by hour, and days in time zones with whole-hour offsets).
-- Keyed down to `user`, so every filter of the analytics API (project, agent, user, provider,
-- model) can be answered here. ORDER BY (tenant, bucket, ...) for tenant + time-range scans;
-- PARTITION BY month of the bucket.
CREATE TABLE IF NOT EXISTS {db}.usage_hourly
(
    tenant LowCardinality(String),
    bucket DateTime64(3, 'UTC'),
    project LowCardinality(String),
    agent LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    user String,
    calls UInt64,
    errors UInt64,
    unpriced UInt64,
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
    latency_ms_sum UInt64,
    latency_count UInt64,
    users AggregateFunction(uniq, String),
    sessions AggregateFunction(uniq, String)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, bucket, project, agent, provider, model, user)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_hourly_mv TO {db}.usage_hourly AS
SELECT
    tenant,
    toStartOfHour(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    user,
    count() AS calls,
    countIf(status = 'error') AS errors,
    countIf(pricing_status = 'unknown_model') AS unpriced,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(cost_nanos) AS cost_nanos,
    sum(cost_input_nanos) AS cost_input_nanos,
    sum(cost_output_nanos) AS cost_output_nanos,
    sum(cost_cache_read_nanos) AS cost_cache_read_nanos,
    sum(cost_cache_write_nanos) AS cost_cache_write_nanos,
    sum(cost_reasoning_nanos) AS cost_reasoning_nanos,
    sum(cost_input_audio_nanos) AS cost_input_audio_nanos,
    sum(cost_output_audio_nanos) AS cost_output_audio_nanos,
    sum(cost_request_nanos) AS cost_request_nanos,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    count(latency_ms) AS latency_count,
    uniqStateIf(user, user != '') AS users,
    uniqStateIf(session_id, session_id != '') AS sessions
FROM {db}.usage_events
GROUP BY tenant, bucket, project, agent, provider, model, user;

-- usage_daily: UTC days (long ranges, breakdowns, month totals).
-- Keyed down to `user`, so every filter of the analytics API (project, agent, user, provider,
-- model) can be answered here. ORDER BY (tenant, bucket, ...) for tenant + time-range scans;
-- PARTITION BY month of the bucket.
CREATE TABLE IF NOT EXISTS {db}.usage_daily
(
    tenant LowCardinality(String),
    bucket DateTime64(3, 'UTC'),
    project LowCardinality(String),
    agent LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    user String,
    calls UInt64,
    errors UInt64,
    unpriced UInt64,
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
    latency_ms_sum UInt64,
    latency_count UInt64,
    users AggregateFunction(uniq, String),
    sessions AggregateFunction(uniq, String)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, bucket, project, agent, provider, model, user)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_daily_mv TO {db}.usage_daily AS
SELECT
    tenant,
    toStartOfDay(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    user,
    count() AS calls,
    countIf(status = 'error') AS errors,
    countIf(pricing_status = 'unknown_model') AS unpriced,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(cost_nanos) AS cost_nanos,
    sum(cost_input_nanos) AS cost_input_nanos,
    sum(cost_output_nanos) AS cost_output_nanos,
    sum(cost_cache_read_nanos) AS cost_cache_read_nanos,
    sum(cost_cache_write_nanos) AS cost_cache_write_nanos,
    sum(cost_reasoning_nanos) AS cost_reasoning_nanos,
    sum(cost_input_audio_nanos) AS cost_input_audio_nanos,
    sum(cost_output_audio_nanos) AS cost_output_audio_nanos,
    sum(cost_request_nanos) AS cost_request_nanos,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    count(latency_ms) AS latency_count,
    uniqStateIf(user, user != '') AS users,
    uniqStateIf(session_id, session_id != '') AS sessions
FROM {db}.usage_events
GROUP BY tenant, bucket, project, agent, provider, model, user;

-- usage_tags_daily: one row per (tag key, tag value) an event carries, per UTC day, so tag
-- breakdowns and a single tag filter stay on an aggregate. Events without tags have no rows here;
-- an event with n tags counts in n rows (never sum across different tag keys).
-- ORDER BY (tenant, tag_key, tag_value, bucket, ...): a breakdown reads one tag key, a filter one
-- key and value, then a time range. PARTITION BY month of the bucket.
CREATE TABLE IF NOT EXISTS {db}.usage_tags_daily
(
    tenant LowCardinality(String),
    tag_key LowCardinality(String),
    tag_value String,
    bucket DateTime64(3, 'UTC'),
    project LowCardinality(String),
    agent LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    calls UInt64,
    errors UInt64,
    unpriced UInt64,
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
    latency_ms_sum UInt64,
    latency_count UInt64,
    users AggregateFunction(uniq, String),
    sessions AggregateFunction(uniq, String)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant, tag_key, tag_value, bucket, project, agent, provider, model)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_tags_daily_mv TO {db}.usage_tags_daily AS
SELECT
    tenant,
    tag_key,
    tag_value,
    toStartOfDay(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    count() AS calls,
    countIf(status = 'error') AS errors,
    countIf(pricing_status = 'unknown_model') AS unpriced,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(cost_nanos) AS cost_nanos,
    sum(cost_input_nanos) AS cost_input_nanos,
    sum(cost_output_nanos) AS cost_output_nanos,
    sum(cost_cache_read_nanos) AS cost_cache_read_nanos,
    sum(cost_cache_write_nanos) AS cost_cache_write_nanos,
    sum(cost_reasoning_nanos) AS cost_reasoning_nanos,
    sum(cost_input_audio_nanos) AS cost_input_audio_nanos,
    sum(cost_output_audio_nanos) AS cost_output_audio_nanos,
    sum(cost_request_nanos) AS cost_request_nanos,
    sum(ifNull(latency_ms, 0)) AS latency_ms_sum,
    count(latency_ms) AS latency_count,
    uniqStateIf(user, user != '') AS users,
    uniqStateIf(session_id, session_id != '') AS sessions
FROM {db}.usage_events
ARRAY JOIN mapKeys(tags) AS tag_key, mapValues(tags) AS tag_value
GROUP BY tenant, tag_key, tag_value, bucket, project, agent, provider, model;
