-- Cost sums in the aggregates become Int128 (nano-USD, as before), so no sum can wrap.
--
-- Why: one event costs at most MAX_EVENT_COST_NANOS = 10^15 nano-USD (1,000,000 USD; the pricing
-- stage stores a price above it as pricing_status = 'cost_over_cap' at cost 0, see
-- spendstream/money.py and spendstream/pricing/logic.py). Int64 holds 9.22 * 10^18, i.e. only
-- 9,223 events at the cap: ten thousand of them in one minute of one key (a client's cost_usd
-- may be at the cap) wrap sum() around to a negative number, silently, in the view, in the
-- SummingMergeTree merge and in every query over the rows. A year of a deployment's traffic is at most
-- MAX_EVENTS_PER_YEAR = 10^13 events, all at the cap 10^28 nano-USD: Int128 (1.7 * 10^38) holds
-- that ten orders of magnitude over. Int128 rather than Decimal128(9): the unit stays nano-USD, so
-- every reader's sum(cost_nanos) and / 1e9 keep working, and clients read an integer.
-- Per-event columns (usage_events, usage_events_in) stay Int64: one event is at most the cap.
-- Token columns stay UInt64 (1.8 * 10^19): at MAX_TOKENS_PER_EVENT = 10^8 per field a row
-- overflows only after 1.8 * 10^11 events, and the coarsest rows are days, which get at most
-- 10^13 / 365 = 2.7 * 10^10 events even at a whole deployment's yearly maximum.
--
-- Each target's cost columns change type (a mutation: existing parts are rewritten in the
-- background, reads convert meanwhile), then its view sums toInt128(...) so that rows of one
-- insert cannot wrap either before they reach the column. The projections of usage_hourly and
-- usage_daily sum those columns, and ClickHouse refuses to change the type under them
-- (CANNOT_CONVERT_TYPE: AggregateFunction(sum, Int64) to AggregateFunction(sum, Int128)): they
-- are dropped, the columns changed, and the same projections added and materialized again
-- (queries read the table meanwhile: a projection only makes them faster). The tenant views keep
-- the column types they were created with and would cast the sums back to Int64 (wrapping), so
-- they are created again over the new types. unpriced also counts 'cost_over_cap' from now on:
-- both are events stored at cost 0 without a usable price.
-- Every statement is re-runnable (a second MODIFY COLUMN to the same type changes nothing).

-- usage_minute
ALTER TABLE {db}.usage_minute
    MODIFY COLUMN cost_nanos Int128,
    MODIFY COLUMN cost_input_nanos Int128,
    MODIFY COLUMN cost_output_nanos Int128,
    MODIFY COLUMN cost_cache_read_nanos Int128,
    MODIFY COLUMN cost_cache_write_nanos Int128,
    MODIFY COLUMN cost_reasoning_nanos Int128,
    MODIFY COLUMN cost_input_audio_nanos Int128,
    MODIFY COLUMN cost_output_audio_nanos Int128,
    MODIFY COLUMN cost_request_nanos Int128;

ALTER TABLE {db}.usage_minute_mv MODIFY QUERY
SELECT
    tenant,
    toStartOfMinute(timestamp) AS bucket,
    project,
    agent,
    provider,
    model,
    count() AS calls,
    countIf(status = 'error') AS errors,
    countIf(pricing_status IN ('unknown_model', 'cost_over_cap')) AS unpriced,
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

-- usage_hourly
ALTER TABLE {db}.usage_hourly DROP PROJECTION IF EXISTS without_user;

ALTER TABLE {db}.usage_hourly
    MODIFY COLUMN cost_nanos Int128,
    MODIFY COLUMN cost_input_nanos Int128,
    MODIFY COLUMN cost_output_nanos Int128,
    MODIFY COLUMN cost_cache_read_nanos Int128,
    MODIFY COLUMN cost_cache_write_nanos Int128,
    MODIFY COLUMN cost_reasoning_nanos Int128,
    MODIFY COLUMN cost_input_audio_nanos Int128,
    MODIFY COLUMN cost_output_audio_nanos Int128,
    MODIFY COLUMN cost_request_nanos Int128;

ALTER TABLE {db}.usage_hourly ADD PROJECTION IF NOT EXISTS without_user
(
    SELECT
        tenant, bucket, project, agent, provider, model,
        sum(calls),
        sum(errors),
        sum(unpriced),
        sum(input_tokens),
        sum(output_tokens),
        sum(cache_read_tokens),
        sum(cache_write_tokens),
        sum(cache_write_1h_tokens),
        sum(reasoning_tokens),
        sum(input_audio_tokens),
        sum(output_audio_tokens),
        sum(cost_nanos),
        sum(cost_input_nanos),
        sum(cost_output_nanos),
        sum(cost_cache_read_nanos),
        sum(cost_cache_write_nanos),
        sum(cost_reasoning_nanos),
        sum(cost_input_audio_nanos),
        sum(cost_output_audio_nanos),
        sum(cost_request_nanos),
        sum(latency_ms_sum),
        sum(latency_count)
    GROUP BY tenant, bucket, project, agent, provider, model
);

ALTER TABLE {db}.usage_hourly MATERIALIZE PROJECTION without_user;

ALTER TABLE {db}.usage_hourly_mv MODIFY QUERY
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
    countIf(pricing_status IN ('unknown_model', 'cost_over_cap')) AS unpriced,
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

-- usage_daily
ALTER TABLE {db}.usage_daily DROP PROJECTION IF EXISTS without_user;

ALTER TABLE {db}.usage_daily
    MODIFY COLUMN cost_nanos Int128,
    MODIFY COLUMN cost_input_nanos Int128,
    MODIFY COLUMN cost_output_nanos Int128,
    MODIFY COLUMN cost_cache_read_nanos Int128,
    MODIFY COLUMN cost_cache_write_nanos Int128,
    MODIFY COLUMN cost_reasoning_nanos Int128,
    MODIFY COLUMN cost_input_audio_nanos Int128,
    MODIFY COLUMN cost_output_audio_nanos Int128,
    MODIFY COLUMN cost_request_nanos Int128;

ALTER TABLE {db}.usage_daily ADD PROJECTION IF NOT EXISTS without_user
(
    SELECT
        tenant, bucket, project, agent, provider, model,
        sum(calls),
        sum(errors),
        sum(unpriced),
        sum(input_tokens),
        sum(output_tokens),
        sum(cache_read_tokens),
        sum(cache_write_tokens),
        sum(cache_write_1h_tokens),
        sum(reasoning_tokens),
        sum(input_audio_tokens),
        sum(output_audio_tokens),
        sum(cost_nanos),
        sum(cost_input_nanos),
        sum(cost_output_nanos),
        sum(cost_cache_read_nanos),
        sum(cost_cache_write_nanos),
        sum(cost_reasoning_nanos),
        sum(cost_input_audio_nanos),
        sum(cost_output_audio_nanos),
        sum(cost_request_nanos),
        sum(latency_ms_sum),
        sum(latency_count)
    GROUP BY tenant, bucket, project, agent, provider, model
);

ALTER TABLE {db}.usage_daily MATERIALIZE PROJECTION without_user;

ALTER TABLE {db}.usage_daily_mv MODIFY QUERY
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
    countIf(pricing_status IN ('unknown_model', 'cost_over_cap')) AS unpriced,
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

-- usage_tags_daily
ALTER TABLE {db}.usage_tags_daily
    MODIFY COLUMN cost_nanos Int128,
    MODIFY COLUMN cost_input_nanos Int128,
    MODIFY COLUMN cost_output_nanos Int128,
    MODIFY COLUMN cost_cache_read_nanos Int128,
    MODIFY COLUMN cost_cache_write_nanos Int128,
    MODIFY COLUMN cost_reasoning_nanos Int128,
    MODIFY COLUMN cost_input_audio_nanos Int128,
    MODIFY COLUMN cost_output_audio_nanos Int128,
    MODIFY COLUMN cost_request_nanos Int128;

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
    count() AS calls,
    countIf(status = 'error') AS errors,
    countIf(pricing_status IN ('unknown_model', 'cost_over_cap')) AS unpriced,
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

-- the analyst views over them (0006), with the new column types
CREATE OR REPLACE VIEW {db}_tenant.usage_minute AS
SELECT * FROM {db}.usage_minute
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE OR REPLACE VIEW {db}_tenant.usage_hourly AS
SELECT * FROM {db}.usage_hourly
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE OR REPLACE VIEW {db}_tenant.usage_daily AS
SELECT * FROM {db}.usage_daily
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE OR REPLACE VIEW {db}_tenant.usage_tags_daily AS
SELECT * FROM {db}.usage_tags_daily
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);
