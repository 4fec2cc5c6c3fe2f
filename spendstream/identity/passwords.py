"""Passwords: argon2id hashes (argon2-cffi), the password policy, and a bounded hashing pool.

A hash costs ``argon2_time_cost`` passes over ``argon2_memory_kib`` of memory (tens of ms of CPU):
``HashPool`` runs them in their own threads (argon2-cffi releases the GIL), at most
``max_concurrent_hashes`` at once, with at most ``max_waiting_hashes`` callers queued; a caller
beyond that gets :class:`HashPoolBusy` at once (the API answers 429), so a login flood costs the
other tenants at most those threads, never the event loop.

Unknown accounts are checked against a dummy hash made with the same parameters, so a login for
an unknown e-mail address takes as long as one with a wrong password.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

T = TypeVar("T")

#: longest password accepted (characters): longer inputs only cost hashing time
MAX_PASSWORD_LENGTH = 256


class PasswordPolicyError(ValueError):
    pass


def check_password(password: str, min_length: int, email: str = "") -> str:
    """``password`` when the policy accepts it; PasswordPolicyError saying why otherwise."""
    if not isinstance(password, str):
        raise PasswordPolicyError("password must be a string")
    if len(password) < min_length:
        raise PasswordPolicyError(f"password must have at least {min_length} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise PasswordPolicyError(f"password must have at most {MAX_PASSWORD_LENGTH} characters")
    if len(set(password)) < 4:
        raise PasswordPolicyError("password must use at least 4 different characters")
    if email and password.strip().lower() in (email.lower(), email.lower().partition("@")[0]):
        raise PasswordPolicyError("password must not be the e-mail address")
    return password


class Passwords:
    """argon2id with the configured cost. ``verify(None, pw)`` burns one dummy verification."""

    def __init__(self, time_cost: int = 3, memory_kib: int = 65_536, parallelism: int = 1):
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._dummy = self._hasher.hash(secrets.token_urlsafe(24))

    @classmethod
    def from_settings(cls, identity) -> Passwords:  # identity: settings.IdentitySettings
        return cls(identity.argon2_time_cost, identity.argon2_memory_kib, identity.argon2_parallelism)

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """True when ``password`` matches ``stored_hash``; an unknown account (None) costs the same
        and is False."""
        try:
            ok = self._hasher.verify(stored_hash or self._dummy, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return ok and stored_hash is not None

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)


class HashPoolBusy(Exception):
    """Too many password hashes are queued already; retry shortly."""


class HashPool:
    def __init__(self, max_concurrent: int, max_waiting: int):
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="argon2")
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_waiting = max_waiting
        self._waiting = 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._slots.locked() and self._waiting >= self._max_waiting:
            raise HashPoolBusy
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._slots.release()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
