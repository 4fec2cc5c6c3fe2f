"""`spendstream processors`: stage selection and the settings handed to stage child processes."""

from __future__ import annotations

import pytest

from spendstream.settings import Settings, settings_env
from stream_processors.main import run


def test_children_see_exactly_the_parents_settings(monkeypatch):
    parent = Settings(
        env="dev",
        bootstrap_admin_key="ss_secret",
        kafka={"bootstrap_servers": "k1:9092,k2:9092", "partitions": 6, "sasl_password": "pw"},
        clickhouse={"url": "http://ch:8123", "password": "chpw"},
        processors={"batch_max_seconds": 0.05},
        sink={"batch_rows": 123},
        notify={"webhook": {"allow_private": True}, "smtp": {"host": "mail", "password": "smtppw"}},
    )
    env = settings_env(parent)
    assert all(name.startswith("SPENDSTREAM_") for name in env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert child == parent
    # secrets travel as values, not as their masked repr
    assert child.kafka.sasl_password.get_secret_value() == "pw"
    assert child.bootstrap_admin_key.get_secret_value() == "ss_secret"
    assert child.notify.smtp.password.get_secret_value() == "smtppw"


@pytest.mark.parametrize("stages", [[], ["pricing", "billing"], ["nope"]])
def test_unknown_or_no_stages_are_refused(stages):
    with pytest.raises(SystemExit, match="stage"):
        run(Settings(), stages)
