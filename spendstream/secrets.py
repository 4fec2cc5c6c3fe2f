"""At-rest encryption of secrets Spendstream keeps for tenants (provider API keys, admin keys). Pure:
no IO, only ``cryptography``'s AES-GCM.

Keys come from the setting ``SPENDSTREAM_SECRET_KEYS``: a comma-separated list of
``<key id>:<32 bytes, url-safe base64>``; the FIRST is the primary key. ``python -m
spendstream.secrets`` prints a fresh entry. Each ciphertext names the key that sealed it::

    b"\\x01" | len(key id) (1 byte) | key id (ASCII) | nonce (12 bytes) | AES-256-GCM ciphertext + tag

The caller's ``aad`` (associated data: what the secret belongs to, e.g. ``tenant/provider/id``)
and the key id are authenticated with it, so a ciphertext copied to another row, or relabelled
with another key id, does not decrypt.

Rotation: put a new entry FIRST and keep the old ones after it. New secrets are sealed with the
new key at once; old ones still decrypt with their own key (``decrypt`` picks the key by the id in
the ciphertext) and can be re-sealed with ``Keyring.reseal`` (``needs_reseal`` tells which). Drop
an old entry only once nothing sealed with it is left (``key_id_of`` names each ciphertext's key);
a ciphertext whose key is no longer configured raises ``SecretError``, it is never silently lost.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SecretError(ValueError):
    """A keyring cannot be built from its setting, or a ciphertext cannot be opened."""


def _b64decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise SecretError(f"not url-safe base64: {exc}") from None


class Keyring:
    """AES-256-GCM keys by id; the first is the primary (the one ``encrypt`` uses)."""

    __slots__ = ("primary_id", "_keys")

    def __init__(self, keys: Sequence[tuple[str, bytes]]):
        if not keys:
            raise SecretError("no encryption key configured (set SPENDSTREAM_SECRET_KEYS)")
        self._keys: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if not _KEY_ID.match(key_id):
                raise SecretError(f"key id {key_id!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
            if len(key) != KEY_BYTES:
                raise SecretError(f"key {key_id!r} must be {KEY_BYTES} bytes, got {len(key)}")
            if key_id in self._keys:
                raise SecretError(f"key id {key_id!r} is configured twice")
            self._keys[key_id] = AESGCM(key)
        self.primary_id = keys[0][0]

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """From the setting's text: ``id:base64key[,id2:base64key2...]`` (first = primary)."""
        keys = []
        for entry in (e.strip() for e in spec.split(",")):
            if not entry:
                continue
            key_id, sep, encoded = entry.partition(":")
            if not sep:
                raise SecretError("each entry must be '<key id>:<base64 key>'")
            keys.append((key_id.strip(), _b64decode(encoded.strip())))
        return cls(keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """``plaintext`` sealed with the primary key, bound to ``aad``."""
        key_id = self.primary_id.encode("ascii")
        header = bytes((FORMAT_VERSION, len(key_id))) + key_id
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + self._keys[self.primary_id].encrypt(nonce, plaintext, header + aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of ``blob``, opened with the key it names; SecretError when the key is not
        configured, the ``aad`` differs or the bytes were changed."""
        key_id, header, body = _split(blob)
        aead = self._keys.get(key_id)
        if aead is None:
            raise SecretError(f"sealed with key {key_id!r}, which is not configured (keep old keys after rotating)")
        try:
            return aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], header + aad)
        except InvalidTag:
            raise SecretError(
                "ciphertext does not authenticate (wrong key, other associated data, or altered)"
            ) from None

    def needs_reseal(self, blob: bytes) -> bool:
        """Sealed with a key other than the primary (after a rotation)."""
        return key_id_of(blob) != self.primary_id

    def reseal(self, blob: bytes, aad: bytes) -> bytes:
        """``blob`` sealed again with the primary key."""
        return self.encrypt(self.decrypt(blob, aad), aad)


def _split(blob: bytes) -> tuple[str, bytes, bytes]:
    if len(blob) < 2 or blob[0] != FORMAT_VERSION:
        raise SecretError("not a Spendstream ciphertext (unknown format)")
    end = 2 + blob[1]
    if len(blob) < end + NONCE_BYTES + 16:
        raise SecretError("ciphertext truncated")
    try:
        key_id = blob[2:end].decode("ascii")
    except UnicodeDecodeError:
        raise SecretError("ciphertext key id is not ASCII") from None
    return key_id, blob[:end], blob[end:]


def key_id_of(blob: bytes) -> str:
    """The id of the key that sealed ``blob`` (no key needed)."""
    return _split(blob)[0]


def generate_key(key_id: str) -> str:
    """A fresh setting entry ``<key id>:<base64 of 32 random bytes>``."""
    if not _KEY_ID.match(key_id):
        raise SecretError(f"key id {key_id!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return f"{key_id}:{base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode('ascii').rstrip('=')}"


if __name__ == "__main__":  # python -m spendstream.secrets [key id]
    import sys
    import time

    print(generate_key(sys.argv[1] if len(sys.argv) > 1 else time.strftime("k%Y%m%d")))
