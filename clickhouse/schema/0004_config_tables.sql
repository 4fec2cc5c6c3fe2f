-- Configuration written by the query API (and `spendstream keys create`). Rows are never updated
-- in place: a change inserts the whole row again with a higher `version` (writers use the
-- write time in microseconds, toUnixTimestamp64Micro(now64(6))), and ReplacingMergeTree keeps the
-- highest version per sorting key. Read the current state with FINAL. Where a table has a
-- `deleted` flag it is the engine's is_deleted column: FINAL also hides rows whose latest version
-- is deleted. These tables are small: none is partitioned, and none has a deduplication window
-- (re-inserting an identical row must not be dropped as a duplicate block).

-- projects: a tenant's projects; `id` is the value events carry in `project`.
-- ORDER BY (tenant, id): the replacing key, and listings are per tenant.
CREATE TABLE IF NOT EXISTS {db}.projects
(
    tenant LowCardinality(String),
    id String,
    name String,
    description String,
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (tenant, id);

-- api_keys: only the SHA-256 of a key is stored (hex); `prefix` is its first characters, shown
-- so people can tell keys apart. Revocation sets revoked_at (the row stays for the audit trail).
-- ORDER BY (tenant, id): the replacing key; the gateway loads all keys (FINAL) into its cache.
CREATE TABLE IF NOT EXISTS {db}.api_keys
(
    tenant LowCardinality(String),
    id String,
    name String,
    key_hash String,
    prefix String,
    scopes Array(LowCardinality(String)),
    created_at DateTime64(3, 'UTC'),
    revoked_at Nullable(DateTime64(3, 'UTC')),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant, id);

-- budgets: scope columns are '' for "any" (all empty = the whole tenant); at most one tag.
-- window: daily | weekly | monthly (calendar, in `timezone`) | rolling_1h | rolling_24h | total.
-- limit_nanos is the limit in nano-USD; thresholds are percents of it. channels holds webhook ids
-- and e-mail addresses. ORDER BY (tenant, id): the replacing key; budgets are read per tenant.
CREATE TABLE IF NOT EXISTS {db}.budgets
(
    tenant LowCardinality(String),
    id String,
    name String,
    scope_project String,
    scope_agent String,
    scope_user String,
    scope_provider String,
    scope_model String,
    scope_tag_key String,
    scope_tag_value String,
    window LowCardinality(String),
    timezone String,
    limit_nanos Int64,
    thresholds Array(Decimal(9, 3)),
    forecast Bool,
    channels Array(String),
    enforce Bool,
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (tenant, id);

-- webhooks: alert channels. format: generic | slack | pagerduty | email (then `email` is set and
-- `url` is empty). `secret` signs generic webhooks (HMAC-SHA256), so it is stored as given; the
-- table is not exposed to tenant SQL. ORDER BY (tenant, id): the replacing key.
CREATE TABLE IF NOT EXISTS {db}.webhooks
(
    tenant LowCardinality(String),
    id String,
    format LowCardinality(String),
    url String,
    email String,
    secret String,
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (tenant, id);

-- price_overrides: a tenant's own prices, in USD per million tokens of each token class and USD
-- per request, applying to events with effective_from <= timestamp < effective_to (NULL = open).
-- A NULL price means "not set by this override" (the pricing stage decides the fallback).
-- ORDER BY (tenant, provider, model, id): the pricing stage looks overrides up by model.
CREATE TABLE IF NOT EXISTS {db}.price_overrides
(
    tenant LowCardinality(String),
    id String,
    provider LowCardinality(String),
    model String,
    effective_from DateTime64(3, 'UTC'),
    effective_to Nullable(DateTime64(3, 'UTC')),
    input_mtok Nullable(Decimal(38, 12)),
    output_mtok Nullable(Decimal(38, 12)),
    cache_read_mtok Nullable(Decimal(38, 12)),
    cache_write_mtok Nullable(Decimal(38, 12)),
    cache_write_1h_mtok Nullable(Decimal(38, 12)),
    reasoning_mtok Nullable(Decimal(38, 12)),
    input_audio_mtok Nullable(Decimal(38, 12)),
    output_audio_mtok Nullable(Decimal(38, 12)),
    request_usd Nullable(Decimal(38, 12)),
    note String,
    created_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (tenant, provider, model, id);
