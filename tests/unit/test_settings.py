import subprocess
import sys

from spendstream.settings import Settings


def test_nested_env(monkeypatch):
    monkeypatch.setenv("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("SPENDSTREAM_CLICKHOUSE__URL", "http://ch:8123")
    monkeypatch.setenv("SPENDSTREAM_GATEWAY__PORT", "9000")
    s = Settings()
    assert s.kafka_bootstrap == "k1:9092,k2:9092"
    assert not s.kafka.embedded
    assert s.clickhouse_url == "http://ch:8123"
    assert not s.clickhouse.embedded
    assert s.gateway.port == 9000


def test_empty_urls_mean_embedded(monkeypatch):
    for k in ("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "SPENDSTREAM_CLICKHOUSE__URL"):
        monkeypatch.delenv(k, raising=False)
    s = Settings()
    assert s.kafka.embedded and s.clickhouse.embedded
    assert s.kafka_bootstrap == "127.0.0.1:9092"


def test_check_config_masks_secrets_and_names_bad_field():
    env = {"SPENDSTREAM_BOOTSTRAP_ADMIN_KEY": "sk-very-secret", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "check-config"], env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "sk-very-secret" not in ok.stdout and "**********" in ok.stdout
    env["SPENDSTREAM_GATEWAY__PORT"] = "not-a-port"
    bad = subprocess.run(
        [sys.executable, "-m", "spendstream.cli", "check-config"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "SPENDSTREAM_GATEWAY__PORT" in bad.stderr
