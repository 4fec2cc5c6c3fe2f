"""The settings renamed by the domain-sections layout still work under their old names, for this
release (spendstream/settings.py, RENAMED_SETTINGS): as environment variables and as keywords,
mapped to the new field with a warning naming the new name; the new name wins over the old.

Every other test uses the new names; this file is the one place the old ones are used."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import spendstream.settings as settings_module
from spendstream.devstack import local_settings
from spendstream.settings import (
    RENAMED_SETTINGS,
    NotifySettings,
    Settings,
    SmtpSettings,
    env_name,
    settings_env,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SPENDSTREAM_")]:
        monkeypatch.delenv(name)


def get(settings: BaseModel, path: tuple[str, ...]) -> Any:
    value: Any = settings
    for part in path:
        value = getattr(value, part)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def sample(path: tuple[str, ...]) -> tuple[str, Any]:
    """A valid value for the setting at ``path`` that differs from its default: (env text, value)."""
    default = get(Settings(), path)
    if isinstance(default, bool):
        return "true" if not default else "false", not default
    if isinstance(default, int):
        return str(default + 7), default + 7
    if isinstance(default, float):
        return str(default * 3), default * 3
    return f"x-{path[-1]}", f"x-{path[-1]}"


def test_the_table_maps_old_processors_fields_to_real_new_settings():
    names = set()
    for old, new in RENAMED_SETTINGS.items():
        assert old[0] == "processors" and old[1] not in settings_module.ProcessorsSettings.model_fields, old
        model: Any = Settings
        for part in new:
            assert part in model.model_fields, new
            model = model.model_fields[part].annotation
        assert not (isinstance(model, type) and issubclass(model, BaseModel)), f"{new} is a section"
        names.add(new)
    assert len(names) == len(RENAMED_SETTINGS), "two old names map to one setting"


@pytest.mark.parametrize("old,new", list(RENAMED_SETTINGS.items()), ids=lambda p: ".".join(p))
def test_old_env_variable_still_works_with_a_warning_naming_the_new(monkeypatch, old, new):
    text, value = sample(new)
    monkeypatch.setenv(env_name(old), text)
    with pytest.warns(DeprecationWarning) as caught:
        s = Settings()
    assert get(s, new) == value
    message = str(caught[0].message)
    assert env_name(old) in message and env_name(new) in message and ".".join(new) in message
    # children get the new name only, and see the same value
    env = settings_env(s)
    assert env[env_name(new)] == text
    assert env_name(old) not in env


@pytest.mark.parametrize("old,new", list(RENAMED_SETTINGS.items()), ids=lambda p: ".".join(p))
def test_old_keyword_still_works_with_a_warning_naming_the_new(tmp_path, old, new):
    _, value = sample(new)
    given = {old[1]: value}
    with pytest.warns(DeprecationWarning, match=".".join(new)):
        # the form the tests used: nested sections as dicts, merged over a base (here web_port)
        s = local_settings(tmp_path, processors=given)
    assert get(s, new) == value
    assert s.processors.web_port != settings_module.ProcessorsSettings().web_port, "the base is kept"
    assert given == {old[1]: value}, "the caller's dict is not changed"


def test_the_new_name_wins_over_the_old(monkeypatch):
    # both as env variables
    monkeypatch.setenv("SPENDSTREAM_PROCESSORS__SINK_BATCH_ROWS", "111")
    monkeypatch.setenv("SPENDSTREAM_SINK__BATCH_ROWS", "222")
    with pytest.warns(DeprecationWarning, match="ignored.*SPENDSTREAM_SINK__BATCH_ROWS"):
        assert Settings().sink.batch_rows == 222
    # both as keywords, at every depth
    with pytest.warns(DeprecationWarning):
        s = Settings(processors={"smtp_host": "old", "webhook_allow_private": False, "budgets_reload_s": 9.0},
                     notify={"smtp": {"host": "new"}, "webhook": {"allow_private": True}},
                     budgets={"reload_s": 0.5})  # fmt: skip
    assert (s.notify.smtp.host, s.notify.webhook.allow_private, s.budgets.reload_s) == ("new", True, 0.5)
    # old keyword against new env variable, and new keyword against old env variable: new wins
    monkeypatch.delenv("SPENDSTREAM_PROCESSORS__SINK_BATCH_ROWS")
    with pytest.warns(DeprecationWarning):
        assert Settings(processors={"sink_batch_rows": 333}).sink.batch_rows == 222
    monkeypatch.delenv("SPENDSTREAM_SINK__BATCH_ROWS")
    monkeypatch.setenv("SPENDSTREAM_PROCESSORS__SMTP_PORT", "2525")
    with pytest.warns(DeprecationWarning):
        assert Settings(notify={"smtp": {"port": 587}}).notify.smtp.port == 587
    # a section given as a model: only the fields it was given count as "new name set"
    monkeypatch.delenv("SPENDSTREAM_PROCESSORS__SMTP_PORT")
    with pytest.warns(DeprecationWarning):
        s = Settings(processors={"smtp_from": "old@x", "smtp_port": 26},
                     notify=NotifySettings(smtp=SmtpSettings(from_address="new@x")))  # fmt: skip
    assert (s.notify.smtp.from_address, s.notify.smtp.port) == ("new@x", 26)


def test_new_names_give_no_warning(monkeypatch):
    monkeypatch.setenv("SPENDSTREAM_NOTIFY__SMTP__HOST", "mail")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Settings(sink={"batch_rows": 5}, processors={"batch_max_records": 7, "web_port": 7000})
    assert (s.notify.smtp.host, s.sink.batch_rows, s.processors.batch_max_records) == ("mail", 5, 7)


def test_an_old_name_is_also_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(settings_module, "_logged_renames", set())
    monkeypatch.setenv("SPENDSTREAM_PROCESSORS__DEDUPE_WINDOW_HOURS", "12")
    with caplog.at_level(logging.WARNING, logger="spendstream.settings"), pytest.warns(DeprecationWarning):
        Settings()
        Settings()
    logged = [r.getMessage() for r in caplog.records if r.name == "spendstream.settings"]
    assert len(logged) == 1 and "SPENDSTREAM_PRICING__DEDUPE_WINDOW_HOURS" in logged[0], logged


def run_check_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spendstream.cli", "check-config"],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)  # fmt: skip


def test_check_config_with_old_names_prints_the_new_sections_and_masks_secrets():
    ok = run_check_config({"SPENDSTREAM_PROCESSORS__SMTP_HOST": "mail.example", "SPENDSTREAM_PROCESSORS__SMTP_PASSWORD":
                           "smtp-very-secret", "SPENDSTREAM_PROCESSORS__SINK_BATCH_ROWS": "77"})  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "smtp-very-secret" not in ok.stdout + ok.stderr
    config = json.loads(ok.stdout)
    assert config["notify"]["smtp"]["host"] == "mail.example"
    assert config["notify"]["smtp"]["password"] == "**********"
    assert config["sink"]["batch_rows"] == 77
    assert not {"smtp_host", "smtp_password", "sink_batch_rows"} & set(config["processors"])
    assert "SPENDSTREAM_NOTIFY__SMTP__HOST" in ok.stderr and "SPENDSTREAM_SINK__BATCH_ROWS" in ok.stderr
    # a bad value under an old name: refused, naming the setting it now is (and the warning the old)
    bad = run_check_config({"SPENDSTREAM_PROCESSORS__SMTP_PORT": "not-a-port"})
    assert bad.returncode == 2
    assert "invalid setting SPENDSTREAM_NOTIFY__SMTP__PORT" in bad.stderr
    assert "SPENDSTREAM_PROCESSORS__SMTP_PORT" in bad.stderr


def test_readme_and_module_docstring_list_exactly_the_renamed_settings():
    expected = {(env_name(old), env_name(new)) for old, new in RENAMED_SETTINGS.items()}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert set(re.findall(r"^\| `(SPENDSTREAM_\w+)` \| `(SPENDSTREAM_\w+)`", readme, re.M)) == expected
    docstring = settings_module.__doc__ or ""
    assert set(re.findall(r"^``(SPENDSTREAM_\w+)``\s+``(SPENDSTREAM_\w+)``$", docstring, re.M)) == expected
