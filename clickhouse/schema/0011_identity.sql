-- People, organisations and login (spendstream/identity/). An organisation IS a tenant: `orgs.id`
-- is the tenant string every other table carries. None of these tables is exposed to tenant SQL
-- (they hold password and token hashes). Configuration-like tables follow 0004: a change inserts
-- the whole row again with a higher `version` and reads use FINAL. Security state that must never
-- be undone (sessions, refresh tokens, revocations) is append-only MergeTree instead: a revoked
-- session stays revoked because nothing can replace its revocation row.

-- orgs: organisations (tenants). ORDER BY id: the replacing key.
CREATE TABLE IF NOT EXISTS {db}.orgs
(
    id String,
    name String,
    created_by String,
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY id;

-- users: `email` is stored lower-cased; `password_hash` is an argon2id PHC string. Email
-- uniqueness: when two rows claim one email, the earliest (created_at, id) is the account (the
-- other registration is answered 409 and its row deleted). ORDER BY id: the replacing key.
CREATE TABLE IF NOT EXISTS {db}.users
(
    id String,
    email String,
    name String,
    password_hash String,
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY id;

-- org_members: a user's role in an organisation (owner | admin | member | viewer); removal is a
-- deleted row. The query API keeps every membership in memory and re-reads this table every
-- identity.cache_refresh_s, so role changes and removals apply within that period.
-- ORDER BY (org, user_id): the replacing key.
CREATE TABLE IF NOT EXISTS {db}.org_members
(
    org String,
    user_id String,
    role LowCardinality(String),
    created_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (org, user_id);

-- invites: `token_hash` is the SHA-256 (hex) of the invite token, shown once to the inviter.
-- Accepting sets accepted_at; revoking sets deleted. ORDER BY (org, id): the replacing key.
CREATE TABLE IF NOT EXISTS {db}.invites
(
    org String,
    id String,
    email String,
    role LowCardinality(String),
    token_hash String,
    invited_by String,
    created_at DateTime64(3, 'UTC'),
    expires_at DateTime64(3, 'UTC'),
    accepted_at Nullable(DateTime64(3, 'UTC')),
    accepted_by String,
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version, deleted)
ORDER BY (org, id);

-- auth_sessions: one row per login (a refresh-token family). Append only.
-- ORDER BY id: sessions are looked up by id on every refresh.
CREATE TABLE IF NOT EXISTS {db}.auth_sessions
(
    id String,
    user_id String,
    created_at DateTime64(3, 'UTC'),
    expires_at DateTime64(3, 'UTC'),
    ip String,
    user_agent String
)
ENGINE = MergeTree
ORDER BY id;

-- refresh_tokens: every refresh token ever issued, by SHA-256 (hex); `parent_id` is the token it
-- was rotated from ('' for the first of a session). Only a session's newest token is valid; a
-- second child of one parent, or an older token presented again, is reuse and revokes the
-- session. Append only. ORDER BY (session_id, id): a refresh reads its session's tokens.
CREATE TABLE IF NOT EXISTS {db}.refresh_tokens
(
    session_id String,
    id String,
    parent_id String,
    token_hash String,
    created_at DateTime64(3, 'UTC'),
    expires_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (session_id, id);

-- session_revocations: a session is revoked when it has a row here (logout, refresh-token reuse,
-- password change). Append only, so a revocation can never be undone. (Removing a member needs
-- no row: every request's access is checked against org_members.) ORDER BY session_id.
CREATE TABLE IF NOT EXISTS {db}.session_revocations
(
    session_id String,
    user_id String,
    reason LowCardinality(String),
    revoked_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY session_id;

-- api_key_owners: who created an API key through the query API (a user id, or `key:<id>` for a
-- key holding the `keys` scope). Someone with the `keys` scope but not `admin` (role member)
-- lists and revokes only the keys they own. Append only. ORDER BY (tenant, owner, key_id).
CREATE TABLE IF NOT EXISTS {db}.api_key_owners
(
    tenant LowCardinality(String),
    owner String,
    key_id String,
    created_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (tenant, owner, key_id);

-- audit_log: every authentication and membership event: who (`actor_id`, `actor_email`), what
-- (`action`, `outcome`, `target`, `detail`), when, from where (`ip`, `user_agent`). `org` is ''
-- for events before an organisation is known (a failed login). Tokens and passwords are never
-- written here. ORDER BY (org, at): read per organisation, newest first.
CREATE TABLE IF NOT EXISTS {db}.audit_log
(
    at DateTime64(3, 'UTC'),
    org String,
    actor_id String,
    actor_email String,
    action LowCardinality(String),
    outcome LowCardinality(String),
    target String,
    detail String,
    ip String,
    user_agent String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (org, at);
