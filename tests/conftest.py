"""Shared, session-scoped test stack.

By default the suite runs against the embedded stack started here on free ports: one Tansu
broker and one embedded ClickHouse per session. Point it at external servers instead with
``SPENDSTREAM_TEST_KAFKA=host:port`` and ``SPENDSTREAM_TEST_CLICKHOUSE=http://host:8123``.

Fixtures:
- ``kafka_bootstrap`` / ``clickhouse_url``: addresses of the broker / ClickHouse under test.
- ``embedded_kafka`` / ``embedded_clickhouse``: handles of the session servers for tests that
  kill or restart them (skipped when an external server is configured). The broker is memory
  only: after ``embedded_kafka.restart()`` every topic and offset is gone for the rest of the
  session, so tests must create their topics themselves (unique names, ``ensure_topics``).
  A test that wants a broker of its own can run ``EmbeddedKafka().start()`` (≈0.1 s).
- ``make_settings(**overrides)``: a ``Settings`` wired to the servers above.
- ``unique_name(prefix)``: a fresh name for topics, groups, Faust app ids, databases.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spendstream.embedded.kafka import EmbeddedKafka
from spendstream.ports import free_port, free_port_run
from spendstream.settings import Settings
from stream_processors.stages import STAGES

EXTERNAL_KAFKA = os.environ.get("SPENDSTREAM_TEST_KAFKA", "")
EXTERNAL_CLICKHOUSE = os.environ.get("SPENDSTREAM_TEST_CLICKHOUSE", "")
#: a port nothing listens on: a test that said it needs no ClickHouse fails fast if it calls one,
#: instead of reaching a developer's `spendstream dev` ClickHouse on the default port
NO_CLICKHOUSE_URL = "http://127.0.0.1:1"


@pytest.fixture(scope="session")
def embedded_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKafka]:
    if EXTERNAL_KAFKA:
        pytest.skip(f"needs the embedded broker; SPENDSTREAM_TEST_KAFKA={EXTERNAL_KAFKA} is external")
    broker = EmbeddedKafka(log_path=tmp_path_factory.mktemp("kafka") / "tansu.log").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    if EXTERNAL_KAFKA:
        return EXTERNAL_KAFKA
    return request.getfixturevalue("embedded_kafka").bootstrap


@pytest.fixture(scope="session")
def embedded_clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if EXTERNAL_CLICKHOUSE:
        pytest.skip(f"needs the embedded ClickHouse; SPENDSTREAM_TEST_CLICKHOUSE={EXTERNAL_CLICKHOUSE} is external")
    # imported here so broker-only tests never load chDB
    from spendstream.embedded.clickhouse import EmbeddedClickHouse

    server = EmbeddedClickHouse(path=str(tmp_path_factory.mktemp("chdb")), port=None).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clickhouse_url(request: pytest.FixtureRequest) -> str:
    if EXTERNAL_CLICKHOUSE:
        return EXTERNAL_CLICKHOUSE
    return request.getfixturevalue("embedded_clickhouse").url


@pytest.fixture(scope="session")
def unique_name() -> Callable[[str], str]:
    """``unique_name("orders")`` -> ``"orders_3f9c0a1b2d"``: valid as a topic, group or database name."""

    def make(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:10]}"

    return make


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture(scope="session")
def make_settings(
    request: pytest.FixtureRequest,
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
    unique_name: Callable[[str], str],
) -> Callable[..., Settings]:
    """Factory for ``Settings`` pointing at the test broker and ClickHouse.

    ``make_settings(kafka={"partitions": 2}, processors={"batch_max_records": 10})``: nested
    sections are given as dicts and merged over the test defaults. Every call gets its own
    ClickHouse database name (unless ``clickhouse={"database": ...}`` is given), its own data
    directory and free ports for the gateway, query API and Faust web server. The database is
    only named, not created: migrations create it.

    ``with_clickhouse=False`` keeps the session ClickHouse from starting for tests that only
    need Kafka; its URL then points at a closed port.
    """

    def make(*, with_clickhouse: bool = True, **overrides: Any) -> Settings:
        data_dir: Path = tmp_path_factory.mktemp("data")
        ch_url = request.getfixturevalue("clickhouse_url") if with_clickhouse else NO_CLICKHOUSE_URL
        base: dict[str, Any] = {
            "data_dir": str(data_dir),
            "kafka": {
                "bootstrap_servers": kafka_bootstrap,
                "profile": "production" if EXTERNAL_KAFKA else "embedded",
            },
            "clickhouse": {
                "url": ch_url,
                "database": unique_name("test"),
                "data_path": str(data_dir / "clickhouse"),
            },
            "gateway": {"port": free_port()},
            "query_api": {"port": free_port()},
            # a stack started from these settings listens on web_port + i, one port per stage
            "processors": {"web_port": free_port_run(len(STAGES))},
            # test servers start no forecast worker until a test asks for a forecast (≈ 2.6 s of CPU each)
            "insights": {"forecast_warm_up": False},
        }
        return Settings(**_deep_merge(base, overrides))

    return make
