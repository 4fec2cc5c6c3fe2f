"""The embedded broker profile (Tansu workarounds) reaches clients only in embedded mode."""

from __future__ import annotations

import pytest

from spendstream.kafka import consumer_kwargs, faust_settings, producer_kwargs
from spendstream.settings import Settings

TANSU_CONSUMER_KEYS = {"session_timeout_ms", "heartbeat_interval_ms", "rebalance_timeout_ms"}
TANSU_FAUST_KEYS = {
    "broker_session_timeout",
    "broker_heartbeat_interval",
    "broker_rebalance_timeout",
    "producer_max_batch_size",
}


def production() -> Settings:
    return Settings(kafka={"bootstrap_servers": "k1:9092,k2:9092", "profile": "production"})


def embedded() -> Settings:
    return Settings(kafka={"bootstrap_servers": "127.0.0.1:19092", "profile": "embedded"})


def test_production_producer_is_idempotent_with_acks_all():
    kw = producer_kwargs(production())
    assert kw["acks"] == "all"
    assert kw["enable_idempotence"] is True
    assert kw["bootstrap_servers"] == "k1:9092,k2:9092"


def test_embedded_producer_has_no_idempotence():
    # Tansu has no InitProducerId: an idempotent producer cannot start against it
    kw = producer_kwargs(embedded())
    assert kw["acks"] == "all"
    assert "enable_idempotence" not in kw


def test_consumer_timeouts_only_in_embedded_mode():
    prod = consumer_kwargs(production(), "g1")
    assert not TANSU_CONSUMER_KEYS & prod.keys()
    emb = consumer_kwargs(embedded(), "g1")
    assert (emb["session_timeout_ms"], emb["heartbeat_interval_ms"], emb["rebalance_timeout_ms"]) == (2_000, 500, 2_000)
    for kw in (prod, emb):
        assert kw["group_id"] == "g1"
        assert kw["enable_auto_commit"] is False
        assert kw["auto_offset_reset"] == "earliest"


def test_faust_production_kwargs_carry_no_tansu_workarounds():
    kw = faust_settings(production())
    assert not TANSU_FAUST_KEYS & kw.keys()
    assert kw["processing_guarantee"] == "at_least_once"
    assert kw["broker"] == "kafka://k1:9092,kafka://k2:9092"


def test_faust_embedded_kwargs_send_one_record_per_batch():
    kw = faust_settings(embedded())
    # one record per batch keeps Tansu's wrong ListOffsets(LATEST) from breaking table recovery
    assert kw["producer_max_batch_size"] == 64
    assert (kw["broker_session_timeout"], kw["broker_heartbeat_interval"]) == (2.0, 0.5)
    assert kw["processing_guarantee"] == "at_least_once"
    assert kw["broker"] == "kafka://127.0.0.1:19092"


def test_empty_bootstrap_means_the_embedded_broker_and_its_profile(monkeypatch):
    monkeypatch.delenv("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("SPENDSTREAM_KAFKA__PROFILE", raising=False)
    s = Settings(kafka={"embedded_port": 19093})
    assert faust_settings(s)["broker"] == "kafka://127.0.0.1:19093"
    assert faust_settings(s)["producer_max_batch_size"] == 64
    assert "enable_idempotence" not in producer_kwargs(s)


@pytest.mark.parametrize("settings", [production(), embedded()], ids=["production", "embedded"])
def test_overrides_win(settings):
    assert producer_kwargs(settings, acks=1)["acks"] == 1
    assert consumer_kwargs(settings, None, auto_offset_reset="none")["auto_offset_reset"] == "none"
