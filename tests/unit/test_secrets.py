"""spendstream.secrets: AES-GCM sealing with key ids, associated data and rotation."""

from __future__ import annotations

import pytest

from spendstream.secrets import Keyring, SecretError, generate_key, key_id_of


def test_round_trip_binds_the_associated_data():
    ring = Keyring.parse(generate_key("k1"))
    sealed = ring.encrypt(b"sk-secret", b"tenant-a/openai")
    assert b"sk-secret" not in sealed and key_id_of(sealed) == "k1"
    assert ring.decrypt(sealed, b"tenant-a/openai") == b"sk-secret"
    with pytest.raises(SecretError, match="authenticate"):
        ring.decrypt(sealed, b"tenant-b/openai")  # copied to another tenant's row
    # fresh nonce per call: the same plaintext never seals to the same bytes
    assert ring.encrypt(b"sk-secret", b"x") != ring.encrypt(b"sk-secret", b"x")


def test_tampering_and_relabelling_are_refused():
    ring = Keyring.parse(f"{generate_key('k1')},{generate_key('k2')}")
    sealed = bytearray(ring.encrypt(b"payload", b"aad"))
    sealed[-1] ^= 1
    with pytest.raises(SecretError):
        ring.decrypt(bytes(sealed), b"aad")
    good = ring.encrypt(b"payload", b"aad")
    relabelled = good[:2] + b"k2" + good[4:]  # claims the other configured key
    with pytest.raises(SecretError):
        ring.decrypt(relabelled, b"aad")
    for junk in (b"", b"\x02\x02k1", good[:10]):
        with pytest.raises(SecretError):
            ring.decrypt(junk, b"aad")


def test_rotation_new_primary_first_old_keys_still_open():
    old_entry, new_entry = generate_key("2026-01"), generate_key("2026-06")
    before = Keyring.parse(old_entry)
    sealed_old = before.encrypt(b"key-1", b"a")
    after = Keyring.parse(f"{new_entry},{old_entry}")
    assert after.primary_id == "2026-06" and after.key_ids == ("2026-06", "2026-01")
    assert after.decrypt(sealed_old, b"a") == b"key-1"
    assert after.needs_reseal(sealed_old)
    resealed = after.reseal(sealed_old, b"a")
    assert key_id_of(resealed) == "2026-06" and not after.needs_reseal(resealed)
    # once the old key is dropped, what it sealed is refused (never silently lost)
    only_new = Keyring.parse(new_entry)
    assert only_new.decrypt(resealed, b"a") == b"key-1"
    with pytest.raises(SecretError, match="not configured"):
        only_new.decrypt(sealed_old, b"a")


@pytest.mark.parametrize(
    "spec",
    ["", "k1", "k1:short", "bad id!:" + generate_key("x").split(":")[1], f"{generate_key('a')},{generate_key('a')}"],
)
def test_invalid_settings_are_refused(spec):
    with pytest.raises(SecretError):
        Keyring.parse(spec)
