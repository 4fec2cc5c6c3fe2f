"""The pure core of people and login: passwords (argon2id, policy, the dummy hash for unknown
accounts, the bounded pool), access tokens (every claim checked), refresh/invite token formats,
roles -> scopes, and the sliding-window login limits."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest

from spendstream.identity.accounts import InvalidAccountField, check_name, new_org_id, normalize_email
from spendstream.identity.cache import IdentityCache, authenticate_user
from spendstream.identity.passwords import HashPool, HashPoolBusy, PasswordPolicyError, Passwords, check_password
from spendstream.identity.roles import ROLE_SCOPES, ROLES, InvalidRole, may_assign, parse_role, scopes_of
from spendstream.identity.store import Snapshot
from spendstream.identity.throttle import SlidingWindow
from spendstream.identity.tokens import (
    AccessTokens,
    InvalidToken,
    looks_like_jwt,
    new_invite_token,
    new_refresh_token,
    parse_invite_token,
    parse_refresh_token,
)
from spendstream.keys import SCOPES, AuthError, KeyStore, Principal, authenticate, check_scopes, check_tenant

SECRET = b"s" * 32


@pytest.fixture(scope="module")
def passwords() -> Passwords:
    return Passwords(time_cost=1, memory_kib=1024, parallelism=1)


def test_argon2id_hash_verifies_and_is_salted(passwords):
    a, b = passwords.hash("correct horse battery"), passwords.hash("correct horse battery")
    assert a.startswith("$argon2id$") and a != b
    assert passwords.verify(a, "correct horse battery")
    assert not passwords.verify(a, "correct horse batterY")
    assert not passwords.verify("not a hash", "x")


def test_an_unknown_account_costs_one_argon2_verification(passwords, monkeypatch):
    calls = []
    real = passwords._hasher

    class Spy:
        def verify(self, stored, password):
            calls.append(stored)
            return real.verify(stored, password)

    monkeypatch.setattr(passwords, "_hasher", Spy())
    assert passwords.verify(None, "anything at all") is False
    assert len(calls) == 1 and calls[0].startswith("$argon2id$")  # the dummy hash, same parameters
    assert calls[0].split("$")[3] == real.hash("x").split("$")[3]


@pytest.mark.parametrize(
    ("password", "reason"),
    [("short", "at least 10"), ("x" * 300, "at most 256"), ("aaaaaaaaaaaa", "4 different"),
     ("ada@example.com", "e-mail"), ("Ada@Example.com", "e-mail")],
)  # fmt: skip
def test_password_policy(password, reason):
    with pytest.raises(PasswordPolicyError, match=reason):
        check_password(password, 10, "ada@example.com")
    assert check_password("correct horse battery", 10, "ada@example.com")


def test_access_token_round_trip_and_every_claim():
    codec = AccessTokens(SECRET, "aud-x", "iss-x", 900)
    token = codec.issue("usr-1", "sess-1")
    assert looks_like_jwt(token) and not looks_like_jwt("ss_0123456789abcdef_" + "x" * 30)
    claims = codec.verify(token)
    assert (claims.user_id, claims.session_id) == ("usr-1", "sess-1")
    raw = jwt.decode(token, SECRET, algorithms=["HS256"], audience="aud-x")
    assert set(raw) == {"sub", "sid", "jti", "iat", "exp", "aud", "iss"} and raw["exp"] - raw["iat"] == 900
    assert codec.verify(codec.issue("usr-1", "sess-1")).jti != claims.jti


def _forge(claims: dict, key: bytes = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda c, t: AccessTokens(SECRET, "aud-x", "iss-x", 60).issue("u", "s", now=time.time() - 120), "expired"),
        (lambda c, t: AccessTokens(SECRET, "other", "iss-x", 60).issue("u", "s"), "audience"),
        (lambda c, t: AccessTokens(SECRET, "aud-x", "other", 60).issue("u", "s"), "invalid"),
        (lambda c, t: AccessTokens(b"k" * 32, "aud-x", "iss-x", 60).issue("u", "s"), "invalid"),
        (lambda c, t: _forge({k: v for k, v in c.items() if k != "sid"}), "invalid"),
        (lambda c, t: _forge({k: v for k, v in c.items() if k != "jti"}), "invalid"),
        (lambda c, t: _forge({**c, "sub": ""}), "invalid"),
        (lambda c, t: jwt.encode(c, "", algorithm="none"), "invalid"),
        (lambda c, t: _forge(c, b"p" * 64, "HS512"), "invalid"),
        (lambda c, t: t[:-4] + "AAAA", "invalid"),
        (lambda c, t: "eyJ.garbage.x", "invalid"),
    ],
)
def test_refused_access_tokens(make, reason):
    codec = AccessTokens(SECRET, "aud-x", "iss-x", 60)
    token = codec.issue("u", "s")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="aud-x")
    forged = make(claims, token)
    assert forged != token
    with pytest.raises(InvalidToken, match=reason):
        codec.verify(forged)


def test_short_keys_are_refused():
    with pytest.raises(ValueError):
        AccessTokens(b"short", "a", "i", 60)


def test_refresh_and_invite_tokens_carry_their_ids():
    token_id, token = new_refresh_token("0123456789abcdef")
    assert parse_refresh_token(token) == ("0123456789abcdef", token_id)
    assert parse_refresh_token("ssr_0123456789abcdef_" + token_id + "_short") is None
    assert parse_refresh_token(None) is None  # type: ignore[arg-type]
    invite = new_invite_token("fedcba9876543210")
    assert parse_invite_token(invite) == "fedcba9876543210"
    assert parse_invite_token(token) is None


def test_roles_map_onto_the_api_key_scopes():
    assert ROLES == ("owner", "admin", "member", "viewer")
    assert all(ROLE_SCOPES[r] <= set(SCOPES) for r in ROLES)
    assert scopes_of("owner") == scopes_of("admin") == frozenset(SCOPES)
    assert scopes_of("member") == frozenset({"read", "keys"})
    assert scopes_of("viewer") == frozenset({"read"})
    assert scopes_of("nonsense") == frozenset()
    assert parse_role(" Admin ") == "admin"
    with pytest.raises(InvalidRole):
        parse_role("root")


@pytest.mark.parametrize(
    ("actor", "old", "new", "allowed"),
    [
        ("owner", "viewer", "owner", True), ("owner", "owner", "admin", True), ("owner", None, "owner", True),
        ("admin", "viewer", "member", True), ("admin", None, "admin", True), ("admin", "member", None, True),
        ("admin", "owner", "admin", False), ("admin", None, "owner", False), ("admin", "owner", None, False),
        ("member", "viewer", "member", False), ("viewer", None, "viewer", False),
    ],
)  # fmt: skip
def test_who_may_assign_which_role(actor, old, new, allowed):
    assert (may_assign(actor, old, new) is None) is allowed


def test_accounts_validation():
    assert normalize_email(" Ada@Example.COM ") == "ada@example.com"
    for bad in ("", "ada", "a@b", "a b@example.com", "a@example.com\nBcc: x@y.z", "x" * 250 + "@example.com", 5):
        with pytest.raises(InvalidAccountField) as exc:
            normalize_email(bad)
        assert exc.value.field == "email"
    assert check_name("  Ada ") == "Ada"
    with pytest.raises(InvalidAccountField):
        check_name("a\x00b")
    assert check_tenant(new_org_id())  # an organisation id is a valid tenant


def test_sliding_window_limits_and_forgets():
    window = SlidingWindow(limit=3, window_s=10)
    for t in (0, 1, 2):
        assert window.retry_after("k", t) == 0
        window.hit("k", t)
    assert window.retry_after("k", 3) == 7  # the first hit leaves the window at 10
    assert window.retry_after("other", 3) == 0
    assert window.retry_after("k", 10.5) == 0
    window.reset("k")
    assert window.retry_after("k", 3) == 0


def test_sliding_window_memory_is_bounded():
    window = SlidingWindow(limit=5, window_s=60, max_keys=100)
    for i in range(10_000):
        window.hit(f"ip-{i}", 0)
    assert len(window) == 100
    for _ in range(1000):
        window.hit("ip-9999", 1)
    assert len(window._hits["ip-9999"]) == 5  # only the last `limit` hits are kept


async def test_hash_pool_bounds_work_and_keeps_the_event_loop_free():
    pool = HashPool(max_concurrent=1, max_waiting=1)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        first = asyncio.create_task(pool.run(time.sleep, 0.3))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(pool.run(time.sleep, 0.01))  # waits for the slot
        await asyncio.sleep(0.02)
        with pytest.raises(HashPoolBusy):  # one running, one waiting: full
            await pool.run(time.sleep, 0.01)
        await asyncio.gather(first, second)
        assert ticks >= 10  # the loop kept running while the hash thread slept
        await pool.run(time.sleep, 0)  # free again
    finally:
        tick_task.cancel()
        pool.close()


# ---------------------------------------------------------------- the membership cache and a person's principal


class Memberships:
    """A loader over a dict the test edits, as ClickHouse would change under the cache."""

    def __init__(self, members: dict[str, dict[str, str]], revoked: set[str] | None = None):
        self.members, self.revoked, self.loads, self.delay = members, revoked or set(), 0, 0.0

    async def __call__(self) -> Snapshot:
        self.loads += 1
        seen = Snapshot({u: dict(o) for u, o in self.members.items()}, frozenset(self.revoked))
        await asyncio.sleep(self.delay)  # a load in flight still returns what it read before
        return seen


CODEC = AccessTokens(SECRET, "aud", "iss", 900)


async def _principal(cache, user="u1", session="s1", header=None, path=None):
    return await authenticate_user(cache, CODEC, CODEC.issue(user, session), header, path)


async def test_a_persons_principal_is_the_api_key_shape_with_the_roles_scopes():
    cache = IdentityCache(Memberships({"u1": {"acme": "viewer"}}))
    await cache.reload()
    principal = await _principal(cache)
    assert principal == Principal("user:u1", "acme", frozenset({"read"}), "user u1", "u1", "s1", "viewer")
    assert check_scopes(principal, ("read",)) is principal
    with pytest.raises(AuthError) as refused:
        check_scopes(principal, ("admin",))
    assert refused.value.status == 403 and "viewer" in refused.value.message


async def test_the_organisation_comes_from_the_path_the_header_or_the_only_membership():
    cache = IdentityCache(Memberships({"u1": {"a": "owner", "b": "viewer"}}), miss_reload_s=0)
    await cache.reload()
    assert (await _principal(cache, header="b")).scopes == frozenset({"read"})
    assert (await _principal(cache, path="a")).role == "owner"
    assert (await _principal(cache, header=" a ", path="a")).tenant == "a"
    cases = {
        "several": ({}, 400, "X-Org-Id"),
        "forged": ({"header": "c"}, 403, None),
        "forged-path": ({"path": "c"}, 403, None),
        "mismatch": ({"header": "b", "path": "a"}, 400, "X-Org-Id"),
    }
    for name, (kw, status, field) in cases.items():
        with pytest.raises(AuthError) as refused:
            await _principal(cache, **kw)
        assert (refused.value.status, refused.value.field) == (status, field), name


async def test_revoked_expired_and_foreign_tokens_are_401():
    cache = IdentityCache(Memberships({"u1": {"a": "owner"}}, revoked={"gone"}))
    await cache.reload()
    for token in (
        CODEC.issue("u1", "gone"),
        CODEC.issue("u1", "s1", now=time.time() - 1000),
        AccessTokens(b"z" * 32, "aud", "iss", 900).issue("u1", "s1"),
    ):
        with pytest.raises(AuthError) as refused:
            await authenticate_user(cache, CODEC, token, None, None)
        assert refused.value.status == 401
    cache.mark_revoked("s1")
    with pytest.raises(AuthError):
        await _principal(cache)
    await cache.reload()  # a load that does not know it yet keeps this process's revocation
    with pytest.raises(AuthError):
        await _principal(cache)


async def test_removal_applies_at_the_next_load_and_a_new_membership_at_once():
    source = Memberships({"u1": {"a": "admin"}})
    cache = IdentityCache(source, miss_reload_s=0)
    await cache.reload()
    source.members["u1"]["b"] = "member"  # joined through another process
    assert (await _principal(cache, header="b")).role == "member"  # a miss reloads
    del source.members["u1"]["a"]
    await cache.reload()
    with pytest.raises(AuthError) as refused:
        await _principal(cache, header="a")
    assert refused.value.status == 403


async def test_reload_after_write_never_settles_for_a_load_that_began_before_the_write():
    source = Memberships({"u1": {"a": "admin"}})
    cache = IdentityCache(source)
    await cache.reload()
    source.delay = 0.05
    in_flight = asyncio.create_task(cache.reload())  # reads "admin"
    await asyncio.sleep(0.01)
    source.members["u1"]["a"] = "viewer"  # the write returns while that load is still running
    await cache.reload_after_write()
    assert cache.orgs_of("u1") == {"a": "viewer"}
    await in_flight


async def test_the_gateways_key_check_refuses_a_persons_token():
    """The gateway stays API-key only: spendstream.keys.authenticate (its one check) knows no JWT."""
    token = CODEC.issue("u1", "s1")
    for headers in ((f"Bearer {token}", None), (None, token)):
        with pytest.raises(AuthError) as refused:
            await authenticate(KeyStore(None), *headers, scopes=("ingest",))
        assert refused.value.status == 401
