"""Tokens: the access token (a JWT, pyjwt, HS256), and the opaque refresh and invite tokens.

An access token names the user (``sub``) and the login session (``sid``), with ``exp``, ``iat``,
``jti``, ``aud`` and ``iss``; every claim is required and checked. It carries no role and no
organisation: those come from the live memberships on each request.

Refresh tokens ``ssr_<session id>_<token id>_<secret>`` and invite tokens
``ssi_<invite id>_<secret>`` are stored only as their SHA-256; the ids in them let the server
find the row without trying hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
_REQUIRED = ["exp", "iat", "jti", "sub", "sid", "aud", "iss"]
_REFRESH_RE = re.compile(r"^ssr_([0-9a-f]{16})_([0-9a-f]{16})_[A-Za-z0-9_-]{32,}$")
_INVITE_RE = re.compile(r"^ssi_([0-9a-f]{16})_[A-Za-z0-9_-]{32,}$")


class InvalidToken(Exception):
    """The token was refused; ``message`` says why in words safe to show the caller."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    session_id: str
    jti: str
    expires_at: int


def looks_like_jwt(token: str) -> bool:
    """A JWT (header.payload.signature, JSON header) rather than an API key (``ss_...``)."""
    return token.startswith("eyJ") and token.count(".") == 2


class AccessTokens:
    def __init__(self, secret: bytes, audience: str, issuer: str, ttl_s: int):
        if len(secret) < 32:
            raise ValueError("the access token key must have at least 32 bytes")
        self._secret = secret
        self.audience = audience
        self.issuer = issuer
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, identity) -> AccessTokens:  # identity: settings.IdentitySettings
        secret = identity.jwt_secret.get_secret_value().encode() or secrets.token_bytes(32)
        return cls(secret, identity.jwt_audience, identity.jwt_issuer, identity.access_ttl_s)

    def issue(self, user_id: str, session_id: str, now: float | None = None) -> str:
        iat = int(time.time() if now is None else now)
        claims = {
            "sub": user_id, "sid": session_id, "jti": uuid.uuid4().hex, "iat": iat, "exp": iat + self.ttl_s,
            "aud": self.audience, "iss": self.issuer,
        }  # fmt: skip
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the access token has expired; refresh it") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("the access token is not for this service (audience)") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid access token") from None
        sub, sid = claims.get("sub"), claims.get("sid")
        if not (isinstance(sub, str) and sub and isinstance(sid, str) and sid):
            raise InvalidToken("invalid access token")
        return AccessClaims(sub, sid, str(claims["jti"]), int(claims["exp"]))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def new_id() -> str:
    return secrets.token_hex(8)


def new_refresh_token(session_id: str) -> tuple[str, str]:
    """(token id, token)."""
    token_id = new_id()
    return token_id, f"ssr_{session_id}_{token_id}_{secrets.token_urlsafe(32)}"


def parse_refresh_token(token: str) -> tuple[str, str] | None:
    """(session id, token id) of a well-formed refresh token, else None."""
    m = _REFRESH_RE.match(token) if isinstance(token, str) else None
    return (m.group(1), m.group(2)) if m else None


def new_invite_token(invite_id: str) -> str:
    return f"ssi_{invite_id}_{secrets.token_urlsafe(32)}"


def parse_invite_token(token: str) -> str | None:
    """The invite id of a well-formed invite token, else None."""
    m = _INVITE_RE.match(token) if isinstance(token, str) else None
    return m.group(1) if m else None
