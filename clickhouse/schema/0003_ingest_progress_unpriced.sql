-- ingest_progress: the highest usage.raw offset (src_offset) already stored, per usage.raw
-- partition. The sink reads it at start-up and drops a priced record whose src.offset is not above
-- it: that is how a record re-priced after a pricing-stage crash is not stored twice (see
-- spendstream/contracts.py). Read as `SELECT src_partition, max(max_src_offset) ... GROUP BY
-- src_partition`; a partition without a row has stored nothing yet.
-- ORDER BY src_partition (the only key; a few rows in total). Not partitioned: tiny.
-- AggregatingMergeTree with SimpleAggregateFunction(max) keeps one row per partition once merged.
CREATE TABLE IF NOT EXISTS {db}.ingest_progress
(
    src_partition UInt32,
    max_src_offset SimpleAggregateFunction(max, UInt64)
)
ENGINE = AggregatingMergeTree
ORDER BY src_partition
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.ingest_progress_mv TO {db}.ingest_progress AS
SELECT
    src_partition,
    max(src_offset) AS max_src_offset
FROM {db}.usage_events
GROUP BY src_partition;

-- unpriced_models: models seen without a price (pricing_status = 'unknown_model'), with how many
-- events and the event-time range they span, so a price can be added and that range re-priced.
-- ORDER BY (tenant, provider, model): listed per tenant. Not partitioned: one row per model.
CREATE TABLE IF NOT EXISTS {db}.unpriced_models
(
    tenant LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    events SimpleAggregateFunction(sum, UInt64),
    first_seen SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_seen SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY (tenant, provider, model)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.unpriced_models_mv TO {db}.unpriced_models AS
SELECT
    tenant,
    provider,
    model,
    count() AS events,
    min(timestamp) AS first_seen,
    max(timestamp) AS last_seen
FROM {db}.usage_events
WHERE pricing_status = 'unknown_model'
GROUP BY tenant, provider, model;
