"""Validation of what people type: e-mail addresses, display names, organisation names and ids."""

from __future__ import annotations

import re
import secrets

_EMAIL_RE = re.compile(r"^[^@\s\x00-\x1f\x7f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}$")
MAX_NAME = 256


class InvalidAccountField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def normalize_email(email: object, field: str = "email") -> str:
    """The lower-cased address when it looks like one (local@domain, at most 254 characters)."""
    if not isinstance(email, str) or len(email) > 254 or not _EMAIL_RE.match(email.strip()):
        raise InvalidAccountField(field, "must be an e-mail address (local@domain, at most 254 characters)")
    return email.strip().lower()


def check_name(name: object, field: str = "name", required: bool = True) -> str:
    if not isinstance(name, str):
        raise InvalidAccountField(field, "must be a string")
    value = name.strip()
    if required and not value:
        raise InvalidAccountField(field, "must not be empty")
    if len(value) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidAccountField(field, f"must be at most {MAX_NAME} printable characters")
    return value


def new_org_id() -> str:
    """A fresh organisation (tenant) id: valid wherever a tenant is (spendstream.keys.check_tenant)."""
    return f"org-{secrets.token_hex(6)}"


def new_user_id() -> str:
    return f"usr-{secrets.token_hex(8)}"
