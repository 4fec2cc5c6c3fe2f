-- Tenant-scoped views for analysts' SQL (POST /v1/sql). Database {db}_tenant holds one view per
-- public table, with the table's name, showing only the rows of the tenant named by the query's
-- `log_comment` setting. The query API runs an analyst's statement with database = {db}_tenant,
-- log_comment = <the key's tenant> and readonly = 1 (readonly stops the statement from changing
-- log_comment itself). A statement without a tenant fails instead of reading every tenant's rows.
-- The views only filter: refusing references outside {db}_tenant (db.table, table functions,
-- system.*) is the query API's job. See clickhouse/README.md.
--
-- Why log_comment and not a custom setting (SQL_spendstream_tenant): the embedded chDB engine
-- has no custom_settings_prefixes, so a custom setting is UNKNOWN_SETTING there; log_comment is a
-- built-in string setting on every ClickHouse, and on a server it also tags each analyst query
-- with its tenant in system.query_log.

CREATE DATABASE IF NOT EXISTS {db}_tenant;

-- current_tenant: the tenant of this query, or an error when none is set. The other views compare
-- with it through a scalar subquery, which ClickHouse evaluates once before reading, so the
-- tenant condition still uses each table's primary key.
CREATE VIEW IF NOT EXISTS {db}_tenant.current_tenant AS
SELECT getSetting('log_comment') AS tenant
WHERE throwIf(tenant = '', 'no tenant scope: tenant views need the tenant in the log_comment setting') = 0;

-- Usage: the raw events and every aggregate (read aggregates with sum()/uniqMerge(), GROUP BY).
CREATE VIEW IF NOT EXISTS {db}_tenant.usage_events AS
SELECT * FROM {db}.usage_events
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.usage_minute AS
SELECT * FROM {db}.usage_minute
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.usage_hourly AS
SELECT * FROM {db}.usage_hourly
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.usage_daily AS
SELECT * FROM {db}.usage_daily
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.usage_tags_daily AS
SELECT * FROM {db}.usage_tags_daily
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.unpriced_models AS
SELECT * FROM {db}.unpriced_models
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

-- Configuration and alert history, as their current state (FINAL). api_keys and webhooks hold
-- secrets or their hashes and have no view.
CREATE VIEW IF NOT EXISTS {db}_tenant.projects AS
SELECT * FROM {db}.projects FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.budgets AS
SELECT * FROM {db}.budgets FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.price_overrides AS
SELECT * FROM {db}.price_overrides FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.budget_alerts AS
SELECT * FROM {db}.budget_alerts FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);

CREATE VIEW IF NOT EXISTS {db}_tenant.alert_deliveries AS
SELECT * FROM {db}.alert_deliveries FINAL
WHERE tenant = (SELECT tenant FROM {db}_tenant.current_tenant);
