-- provider_keys: a tenant's provider API keys (OpenAI, Anthropic) for the gateway's proxy
-- (/proxy/<provider>/v1/...), written by the query API's /v1/provider-keys. The key itself is only
-- stored sealed: `ciphertext` is AES-256-GCM (spendstream/secrets.py; hex of the bytes, which name
-- the sealing key's id, so keys can be rotated) bound to tenant, id and provider. `project` is the
-- default project of calls made with the key (X-Spendstream-Project overrides it). Rows follow the
-- config tables' rules (0004): a change or a delete inserts the whole row again with a higher
-- version; FINAL hides deleted keys. No tenant view: this table holds secrets.
-- ORDER BY (tenant, id): the replacing key; the gateway loads all live keys (FINAL) into memory.
CREATE TABLE IF NOT EXISTS {db}.provider_keys
(
    tenant LowCardinality(String),
    id String,
    provider LowCardinality(String),
    name String,
    project String,
    ciphertext String,
    created_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (tenant, id);
