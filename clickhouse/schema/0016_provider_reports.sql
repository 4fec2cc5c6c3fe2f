-- Provider usage and cost reports (spendstream/collectors/): what OpenAI's and Anthropic's admin
-- APIs say an organisation used and spent, next to what Spendstream counted (/v1/reconciliation).

-- provider_connections: a tenant's admin-API connections, written by the query API's
-- /v1/provider-connections. The admin key is only stored sealed: `ciphertext` is AES-256-GCM
-- (spendstream/secrets.py, hex; names its key id for rotation) bound to tenant, id and provider.
-- Config-table rules (0004): a change or delete inserts the row again with a higher version; FINAL
-- hides deleted connections. `channels` (webhook ids, e-mail addresses) receive the
-- `reconciliation` alert when a day's drift exceeds both thresholds; `project_map` maps the
-- provider's project / workspace ids to Spendstream project names for /v1/reconciliation?by=project.
-- No tenant view: this table holds secrets.
-- ORDER BY (tenant, id): the replacing key.
CREATE TABLE IF NOT EXISTS {db}.provider_connections
(
    tenant LowCardinality(String),
    id String,
    provider LowCardinality(String),
    name String,
    ciphertext String,
    backfill_days UInt16,
    drift_threshold_pct Decimal(9, 3),
    drift_threshold_nanos Int64,
    channels Array(String),
    project_map Map(String, String),
    created_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (tenant, id);

-- provider_usage_hourly: one row per (hourly bucket, group) of a provider's usage report, tokens in
-- the event contract's meaning (input_tokens INCLUDES cache reads/writes; Anthropic's uncached
-- input + cache read + cache creation). A run writes every bucket it collected whole, all rows of
-- one bucket with the run's `version`; a bucket without usage gets one all-zero row (row_index 0,
-- model '') so an emptied bucket also replaces its old rows. Readers take, per (connection_id,
-- bucket_start), only the rows of the highest version (the tenant view below does): a re-collected
-- bucket replaces the previous collection even when its groups changed.
-- ORDER BY (tenant, connection_id, bucket_start, row_index): the bucket is the replacing unit;
-- row_index (the row's position in its bucket) keeps distinct groups of one collection apart, and
-- merges keep only the newest version of each position, so storage stays one collection per bucket.
CREATE TABLE IF NOT EXISTS {db}.provider_usage_hourly
(
    tenant LowCardinality(String),
    connection_id String,
    provider LowCardinality(String),
    bucket_start DateTime64(3, 'UTC'),
    bucket_end DateTime64(3, 'UTC'),
    row_index UInt32,
    model LowCardinality(String),
    project_id String,
    api_key_id String,
    service_tier LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    cache_write_1h_tokens UInt64,
    input_audio_tokens UInt64,
    output_audio_tokens UInt64,
    requests UInt64,
    web_search_requests UInt64,
    collected_at DateTime64(3, 'UTC'),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(bucket_start)
ORDER BY (tenant, connection_id, bucket_start, row_index)
SETTINGS non_replicated_deduplication_window = 1000;

-- provider_costs_daily: one row per (daily bucket, cost line) of a provider's cost report, in exact
-- nano-USD (OpenAI's float dollars via their shortest repr; Anthropic's decimal-string cents
-- exactly). `model` is Anthropic's model field, or the model named first in OpenAI's line_item.
-- Same replacement rules and ORDER BY reasoning as provider_usage_hourly.
CREATE TABLE IF NOT EXISTS {db}.provider_costs_daily
(
    tenant LowCardinality(String),
    connection_id String,
    provider LowCardinality(String),
    bucket_start DateTime64(3, 'UTC'),
    bucket_end DateTime64(3, 'UTC'),
    row_index UInt32,
    model LowCardinality(String),
    project_id String,
    line_item String,
    cost_type LowCardinality(String),
    token_type LowCardinality(String),
    service_tier LowCardinality(String),
    currency LowCardinality(String),
    amount_nanos Int64,
    collected_at DateTime64(3, 'UTC'),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(bucket_start)
ORDER BY (tenant, connection_id, bucket_start, row_index)
SETTINGS non_replicated_deduplication_window = 1000;

-- collector_runs: one row per collection of one dataset ('usage' | 'costs') of one connection,
-- written when the run ends (ok or error). The watermark of a dataset is the highest `watermark`
-- of its ok runs. `error` never holds the admin key (masked before it is written).
-- ORDER BY (tenant, connection_id, dataset, started_at): watermark and history lookups.
CREATE TABLE IF NOT EXISTS {db}.collector_runs
(
    tenant LowCardinality(String),
    connection_id String,
    provider LowCardinality(String),
    dataset LowCardinality(String),
    run_id String,
    trigger LowCardinality(String),
    started_at DateTime64(3, 'UTC'),
    finished_at DateTime64(3, 'UTC'),
    status LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    watermark DateTime64(3, 'UTC'),
    buckets UInt32,
    rows UInt32,
    pages UInt32,
    retries UInt32,
    error String
)
ENGINE = MergeTree
ORDER BY (tenant, connection_id, dataset, started_at);

-- Tenant views for /v1/sql (see 0006): the current collection of each bucket of live connections
-- only, as /v1/reconciliation reads them.
CREATE VIEW IF NOT EXISTS {db}_tenant.provider_usage_hourly AS
SELECT * FROM {db}.provider_usage_hourly FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant)
  AND connection_id IN (
    SELECT id FROM {db}.provider_connections FINAL WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant))
  AND (connection_id, bucket_start, version) IN (
    SELECT connection_id, bucket_start, max(version) FROM {db}.provider_usage_hourly
    WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant)
    GROUP BY connection_id, bucket_start);

CREATE VIEW IF NOT EXISTS {db}_tenant.provider_costs_daily AS
SELECT * FROM {db}.provider_costs_daily FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant)
  AND connection_id IN (
    SELECT id FROM {db}.provider_connections FINAL WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant))
  AND (connection_id, bucket_start, version) IN (
    SELECT connection_id, bucket_start, max(version) FROM {db}.provider_costs_daily
    WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant)
    GROUP BY connection_id, bucket_start);
