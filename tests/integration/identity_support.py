"""Test support for people and organisations: settings with a cheap argon2 and a known JWT key,
and helpers that register, log in and invite through the real query API."""

from __future__ import annotations

from typing import Any

import httpx

JWT_SECRET = "test-jwt-secret-" + "k" * 32
PASSWORD = "correct horse battery"

#: cheap hashes (the cost is a setting; the code path is the same)
IDENTITY = {
    "jwt_secret": JWT_SECRET,
    "argon2_time_cost": 1,
    "argon2_memory_kib": 1024,
    "cache_refresh_s": 0.5,
    "login_attempts_per_ip": 10_000,
}


def register(api: httpx.Client, email: str, name: str = "Ada", password: str = PASSWORD, **extra: Any) -> dict:
    answer = api.post("/auth/register", json={"email": email, "password": password, "name": name, **extra})
    assert answer.status_code == 201, answer.text
    return answer.json()


def login(api: httpx.Client, email: str, password: str = PASSWORD) -> dict:
    answer = api.post("/auth/login", json={"email": email, "password": password})
    assert answer.status_code == 200, answer.text
    return answer.json()


def bearer(token: str, org: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if org is not None:
        headers["X-Org-Id"] = org
    return headers


def invite_and_accept(api: httpx.Client, inviter_token: str, org: str, email: str, role: str, **accept: Any) -> dict:
    answer = api.post(f"/v1/orgs/{org}/invites", json={"email": email, "role": role}, headers=bearer(inviter_token))
    assert answer.status_code == 201, answer.text
    body = {"token": answer.json()["token"], "password": PASSWORD, "name": email.split("@")[0], **accept}
    accepted = api.post("/auth/accept-invite", json=body)
    assert accepted.status_code == 200, accepted.text
    return accepted.json()
