-- Alert history, append-only. An alert or a delivery attempt recorded twice (a stage restarted
-- and replayed its input) has the same sorting key, so ReplacingMergeTree keeps one: read with
-- FINAL (or GROUP BY the key) for exact counts. Not partitioned: alerts are rare.

-- budget_alerts: one row per alert emitted on spendstream.budget.alerts.
-- kind: threshold | forecast. alert_id is stable per (budget, window start, threshold).
-- Money in nano-USD; percent_used and threshold in percent; top is the JSON list of the top
-- agents/models in the window. window_end is NULL for `total` budgets.
-- ORDER BY (tenant, alert_id): the replacing key; history is listed per tenant.
CREATE TABLE IF NOT EXISTS {db}.budget_alerts
(
    tenant LowCardinality(String),
    alert_id String,
    kind LowCardinality(String),
    budget_id String,
    budget_name String,
    scope Map(String, String),
    window_start DateTime64(3, 'UTC'),
    window_end Nullable(DateTime64(3, 'UTC')),
    threshold Decimal(9, 3),
    spent_nanos Int64,
    limit_nanos Int64,
    percent_used Decimal(18, 4),
    projected_nanos Nullable(Int64),
    projected_at Nullable(DateTime64(3, 'UTC')),
    event_id String,
    top String,
    fired_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant, alert_id);

-- alert_deliveries: every attempt to deliver an alert to a channel (webhook id or e-mail
-- address). outcome: delivered | failed (will retry) | gave_up (retry horizon passed) |
-- refused (e.g. URL not allowed). http_status is NULL when no HTTP answer came.
-- ORDER BY (tenant, alert_id, channel, attempt): the replacing key, and a delivery history is
-- read per alert.
CREATE TABLE IF NOT EXISTS {db}.alert_deliveries
(
    tenant LowCardinality(String),
    alert_id String,
    channel String,
    format LowCardinality(String),
    attempt UInt32,
    attempted_at DateTime64(3, 'UTC'),
    outcome LowCardinality(String),
    http_status Nullable(UInt16),
    error String,
    duration_ms UInt32
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant, alert_id, channel, attempt);
