"""`spendstream dev` keeps one development keyring, so the collectors (and stored provider keys)
run there without configuration; a configured one always wins."""

from __future__ import annotations

from pydantic import SecretStr

from spendstream.devstack import Stack, _dev_secret_keys, local_settings
from spendstream.secrets import Keyring


def test_dev_keyring_is_made_once_private_and_usable(tmp_path):
    settings = local_settings(tmp_path)
    spec = _dev_secret_keys(tmp_path, settings)
    assert _dev_secret_keys(tmp_path, settings) == spec
    assert (tmp_path / "dev-secret-keys").stat().st_mode & 0o777 == 0o600
    ring = Keyring.parse(spec)
    assert ring.decrypt(ring.encrypt(b"k", b"a"), b"a") == b"k"
    configured = settings.model_copy(update={"secret_keys": SecretStr("mine:" + "A" * 43)})
    assert _dev_secret_keys(tmp_path, configured) == "mine:" + "A" * 43


def test_the_dev_stack_runs_the_collectors_when_a_keyring_is_set(tmp_path):
    settings = local_settings(tmp_path)
    assert "collectors" not in Stack(settings, tmp_path).names
    with_keys = settings.model_copy(update={"secret_keys": SecretStr(_dev_secret_keys(tmp_path, settings))})
    stack = Stack(with_keys, tmp_path)
    assert "collectors" in stack.names
