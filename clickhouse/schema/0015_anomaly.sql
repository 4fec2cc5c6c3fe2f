-- Spend anomaly detection (the anomaly stage, docs/anomaly.md).
--
-- anomaly_settings: one row per tenant that changed the defaults (PUT /v1/anomaly-settings);
-- a change inserts the whole row with a higher version. The anomaly stage re-reads it every
-- anomaly.baseline_reload_s. min_excess_nanos in nano-USD; channels are webhook ids or e-mail
-- addresses as in budgets; muted lists "project" or "project/agent" scopes that never alert.
-- ORDER BY tenant: the replacing key (one live row per tenant).
CREATE TABLE IF NOT EXISTS {db}.anomaly_settings
(
    tenant LowCardinality(String),
    enabled UInt8,
    score_threshold Float64,
    min_ratio Float64,
    min_excess_nanos Int64,
    extreme_ratio Float64,
    channels Array(String),
    muted Array(String),
    updated_at DateTime64(3, 'UTC'),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY tenant;

-- Anomaly alerts share the alert history with budget alerts (kind = 'anomaly', budget_id =
-- 'anomaly'); their explanation (usual spend, ratio, excess by model, spike type, example
-- events) is the JSON in `details`, '' for budget alerts.
ALTER TABLE {db}.budget_alerts ADD COLUMN IF NOT EXISTS details String DEFAULT '';

-- The tenant view lists the columns its table had when it was created: re-create it.
CREATE OR REPLACE VIEW {db}_tenant.budget_alerts AS
SELECT * FROM {db}.budget_alerts FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.anomaly_settings AS
SELECT * FROM {db}.anomaly_settings FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);
