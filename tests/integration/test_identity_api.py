"""People and organisations through the real query API on the embedded ClickHouse: register,
login, the token on analytics, refresh rotation and reuse, logout, /auth/me, invites, roles,
removal within seconds, X-Org-Id, and the isolation of organisations."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest
from identity_support import IDENTITY, JWT_SECRET, PASSWORD, bearer, invite_and_accept, login, register
from notify_support import Mailbox
from pydantic import ValidationError
from query_api_stack import QueryApiServer, insert_events, make_events, migrate

from spendstream.clickhouse import get_async_client, get_client
from spendstream.devstack import child_env
from spendstream.identity import store
from spendstream.identity.passwords import Passwords
from spendstream.identity.tokens import AccessTokens
from spendstream.settings import Settings

pytestmark = pytest.mark.clickhouse

NOW = datetime.now(UTC).replace(microsecond=0)
RANGE = {"from": (NOW - timedelta(days=2)).isoformat(), "to": (NOW + timedelta(hours=1)).isoformat()}


@pytest.fixture(scope="module")
def server(make_settings):
    settings = make_settings(identity=IDENTITY)
    migrate(settings)
    with QueryApiServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield client


def _overview(api: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    return api.get("/v1/analytics/overview", params=RANGE, headers=headers)


def _cost_of(events: list[dict]) -> int:
    return sum(e["cost_nanos"] for e in events)


def test_register_login_and_read_analytics_with_the_token(server, api):
    registered = register(api, "ada@example.com", "Ada")
    org = registered["org"]["id"]
    assert registered["user"]["email"] == "ada@example.com" and registered["org"]["role"] == "owner"
    assert "password" not in str(registered) and "hash" not in str(registered)
    events = make_events(org, 40, NOW - timedelta(days=1), NOW, seed=1)
    insert_events(server.settings, events)

    tokens = login(api, "ADA@example.com")
    assert set(tokens) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 900
    answer = _overview(api, bearer(tokens["access_token"]))
    assert answer.status_code == 200, answer.text
    assert int(answer.json()["cost_nanos"]) == _cost_of(events)

    me = api.get("/auth/me", headers=bearer(tokens["access_token"])).json()
    assert me["user"]["name"] == "Ada"
    assert me["orgs"] == [{"id": org, "name": "Ada's organisation", "role": "owner"}]


def test_register_twice_is_409_naming_email(api):
    register(api, "twice@example.com")
    answer = api.post("/auth/register", json={"email": "Twice@Example.com", "password": PASSWORD, "name": "B"})
    assert answer.status_code == 409
    assert answer.json()["field"] == "email"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-address", "password": PASSWORD, "name": "x"}, "email"),
        ({"email": "short@example.com", "password": "short", "name": "x"}, "password"),
        ({"email": "same@example.com", "password": "aaaaaaaaaaaa", "name": "x"}, "password"),
        ({"email": "noname@example.com", "password": PASSWORD, "name": "   "}, "name"),
        ({"email": "noname@example.com", "password": PASSWORD}, "name"),
        ({"password": PASSWORD, "name": "x"}, "email"),
        ({"email": "long@example.com", "password": "p" * 5000, "name": "x"}, "password"),
        ({"email": "org@example.com", "password": PASSWORD, "name": "x", "org_name": "\x00"}, "org_name"),
    ],
)
def test_register_errors_name_the_field(api, body, field):
    answer = api.post("/auth/register", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field, answer.text


def test_login_wrong_password_and_unknown_account_get_the_same_answer(api):
    register(api, "grace@example.com", "Grace")
    wrong = api.post("/auth/login", json={"email": "grace@example.com", "password": "wrong password!"})
    unknown = api.post("/auth/login", json={"email": "nobody@example.com", "password": "wrong password!"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    metrics = api.get("/metrics").text
    assert 'spendstream_query_api_auth_events_total{action="login",outcome="failed"}' in metrics


def test_refresh_rotates_and_reuse_revokes_the_whole_session(api):
    register(api, "rot@example.com")
    first = login(api, "rot@example.com")
    second = api.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200, second.text
    second = second.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert api.get("/auth/me", headers=bearer(second["access_token"])).status_code == 200

    # the old refresh token again: reuse, the session (every token of it) is revoked
    reused = api.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.status_code == 401 and "already used" in reused.json()["message"]
    assert api.post("/auth/refresh", json={"refresh_token": second["refresh_token"]}).status_code == 401
    assert api.get("/auth/me", headers=bearer(second["access_token"])).status_code == 401
    assert api.get("/auth/me", headers=bearer(first["access_token"])).status_code == 401
    assert _overview(api, bearer(second["access_token"])).status_code == 401
    # another session of the same user is untouched
    other = login(api, "rot@example.com")
    assert api.get("/auth/me", headers=bearer(other["access_token"])).status_code == 200


def test_revoked_refresh_tokens_stay_revoked_after_a_merge(server, api):
    register(api, "merge@example.com")
    first = login(api, "merge@example.com")
    assert api.post("/auth/logout", headers=bearer(first["access_token"])).status_code == 204
    client = get_client(server.settings)
    try:  # merges must not resurrect anything: the revocation is an append-only row
        for table in ("auth_sessions", "refresh_tokens", "session_revocations"):
            client.command(f"OPTIMIZE TABLE {table} FINAL")
    finally:
        client.close()
    assert api.post("/auth/refresh", json={"refresh_token": first["refresh_token"]}).status_code == 401


def test_logout_ends_the_session_by_access_or_refresh_token(api):
    register(api, "bye@example.com")
    a = login(api, "bye@example.com")
    assert api.post("/auth/logout", headers=bearer(a["access_token"])).status_code == 204
    assert api.get("/auth/me", headers=bearer(a["access_token"])).status_code == 401
    assert _overview(api, bearer(a["access_token"])).status_code == 401
    assert api.post("/auth/refresh", json={"refresh_token": a["refresh_token"]}).status_code == 401

    b = login(api, "bye@example.com")
    assert api.post("/auth/logout", json={"refresh_token": b["refresh_token"]}).status_code == 204
    assert api.get("/auth/me", headers=bearer(b["access_token"])).status_code == 401
    assert api.post("/auth/logout", json={"refresh_token": "ssr_nope"}).status_code == 401


def test_expired_tampered_wrong_audience_and_foreign_tokens_are_401(api):
    register(api, "tok@example.com")
    good = login(api, "tok@example.com")["access_token"]
    claims = jwt.decode(good, options={"verify_signature": False})
    user, session = claims["sub"], claims["sid"]
    expired = AccessTokens(JWT_SECRET.encode(), "spendstream-query-api", "spendstream", 60).issue(
        user, session, now=time.time() - 3600
    )
    other_audience = AccessTokens(JWT_SECRET.encode(), "another-service", "spendstream", 900).issue(user, session)
    foreign_key = AccessTokens(b"x" * 32, "spendstream-query-api", "spendstream", 900).issue(user, session)
    head, payload, signature = good.split(".")
    tampered = f"{head}.{payload[:-2]}AA.{signature}"
    none_alg = jwt.encode({**claims}, key="", algorithm="none")
    for name, token in {
        "expired": expired, "audience": other_audience, "foreign": foreign_key, "tampered": tampered,
        "none": none_alg,
    }.items():  # fmt: skip
        for answer in (_overview(api, bearer(token)), api.get("/auth/me", headers=bearer(token))):
            assert answer.status_code == 401, (name, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
    assert "expired" in _overview(api, bearer(expired)).json()["message"]
    assert "audience" in _overview(api, bearer(other_audience)).json()["message"]
    assert _overview(api, bearer(good)).status_code == 200


def test_invite_accept_role_change_and_removal(server, api):
    owner = register(api, "boss@example.com", "Boss")
    org = owner["org"]["id"]
    boss = login(api, "boss@example.com")["access_token"]

    invited = api.post(f"/v1/orgs/{org}/invites", json={"email": "Vic@Example.com", "role": "viewer"},
                       headers=bearer(boss))  # fmt: skip
    assert invited.status_code == 201, invited.text
    body = invited.json()
    assert set(body) >= {"id", "token", "expires_at"} and body["emailed"] is False
    accepted = api.post("/auth/accept-invite", json={"token": body["token"], "password": PASSWORD, "name": "Vic"})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["org"] == {"id": org, "name": "Boss's organisation", "role": "viewer"}
    # an invite works once
    again = api.post("/auth/accept-invite", json={"token": body["token"], "password": PASSWORD, "name": "Vic"})
    assert again.status_code == 422 and again.json()["field"] == "token"

    vic = login(api, "vic@example.com")["access_token"]
    vic_id = accepted.json()["user"]["id"]
    assert _overview(api, bearer(vic)).status_code == 200
    assert api.post("/v1/projects", json={"id": "p1", "name": "P"}, headers=bearer(vic)).status_code == 403
    assert api.post(f"/v1/orgs/{org}/invites", json={"email": "x@example.com", "role": "viewer"},
                    headers=bearer(vic)).status_code == 403  # fmt: skip
    members = api.get(f"/v1/orgs/{org}/members", headers=bearer(vic)).json()["members"]
    assert {(m["email"], m["role"]) for m in members} == {("boss@example.com", "owner"), ("vic@example.com", "viewer")}

    # promoted: the next request of the same token may write
    promoted = api.put(f"/v1/orgs/{org}/members/{vic_id}", json={"role": "admin"}, headers=bearer(boss))
    assert promoted.status_code == 200 and promoted.json()["role"] == "admin"
    assert api.post("/v1/projects", json={"id": "p1", "name": "P"}, headers=bearer(vic)).status_code == 201
    # an admin may not touch the owner role
    boss_id = owner["user"]["id"]
    assert api.put(f"/v1/orgs/{org}/members/{boss_id}", json={"role": "viewer"},
                   headers=bearer(vic)).status_code == 403  # fmt: skip
    # nor may the last owner step down
    last = api.put(f"/v1/orgs/{org}/members/{boss_id}", json={"role": "admin"}, headers=bearer(boss))
    assert last.status_code == 409 and last.json()["field"] == "role"

    removed = api.delete(f"/v1/orgs/{org}/members/{vic_id}", headers=bearer(boss))
    assert removed.status_code == 204
    assert _overview(api, bearer(vic)).status_code == 403
    assert api.get(f"/v1/orgs/{org}/members/{vic_id}", headers=bearer(boss)).status_code == 404

    audit = api.get(f"/v1/orgs/{org}/audit", headers=bearer(boss)).json()["events"]
    actions = {e["action"] for e in audit}
    assert {"register", "invite", "accept_invite", "member_role", "member_remove"} <= actions
    assert not any(body["token"] in str(e) for e in audit)


def test_removal_by_another_process_applies_within_seconds(server, api):
    """The membership is deleted straight in ClickHouse, as another query API process would: this
    process's cache picks it up within identity.cache_refresh_s (0.5 s here)."""
    owner = register(api, "own2@example.com")
    org = owner["org"]["id"]
    boss = login(api, "own2@example.com")["access_token"]
    member = invite_and_accept(api, boss, org, "mem2@example.com", "member")
    token = login(api, "mem2@example.com")["access_token"]
    assert _overview(api, bearer(token)).status_code == 200

    client = get_client(server.settings)
    try:
        now = datetime.now(UTC)
        client.insert(
            "org_members",
            [[org, member["user"]["id"], "member", now, now, 1, time.time_ns() // 1000]],
            column_names=["org", "user_id", "role", "created_at", "updated_at", "deleted", "version"],
        )
    finally:
        client.close()
    removed_at = time.monotonic()
    while _overview(api, bearer(token)).status_code == 200:
        assert time.monotonic() - removed_at < 3.0, "still a member 3 s after removal"
        time.sleep(0.05)
    assert _overview(api, bearer(token)).status_code == 403


def test_x_org_id_selects_the_organisation_and_cannot_be_forged(server, api):
    a = register(api, "alice@example.com", "Alice")
    b = register(api, "bob@example.com", "Bob")
    org_a, org_b = a["org"]["id"], b["org"]["id"]
    events_a = make_events(org_a, 30, NOW - timedelta(days=1), NOW, seed=2)
    events_b = make_events(org_b, 25, NOW - timedelta(days=1), NOW, seed=3)
    insert_events(server.settings, events_a + events_b)
    alice = login(api, "alice@example.com")["access_token"]

    # one organisation: no header needed; a forged header is 403, whatever the route
    assert int(_overview(api, bearer(alice)).json()["cost_nanos"]) == _cost_of(events_a)
    for answer in (
        _overview(api, bearer(alice, org_b)),
        api.post("/v1/sql", json={"sql": "SELECT sum(cost_nanos) FROM usage_events"}, headers=bearer(alice, org_b)),
        api.get(f"/v1/orgs/{org_b}/members", headers=bearer(alice)),
        api.get(f"/v1/orgs/{org_b}/members", headers=bearer(alice, org_b)),
    ):
        assert answer.status_code == 403, answer.text
    mismatch = api.get(f"/v1/orgs/{org_a}/members", headers=bearer(alice, org_b))
    assert mismatch.status_code == 400 and mismatch.json()["field"] == "X-Org-Id"

    # two organisations: the header picks one, and is required
    bob = login(api, "bob@example.com")["access_token"]
    invite_and_accept(api, bob, org_b, "alice@example.com", "viewer", name=None)
    both = api.get("/auth/me", headers=bearer(alice)).json()["orgs"]
    assert {(o["id"], o["role"]) for o in both} == {(org_a, "owner"), (org_b, "viewer")}
    missing = _overview(api, bearer(alice))
    assert missing.status_code == 400 and missing.json()["field"] == "X-Org-Id"
    assert int(_overview(api, bearer(alice, org_a)).json()["cost_nanos"]) == _cost_of(events_a)
    assert int(_overview(api, bearer(alice, org_b)).json()["cost_nanos"]) == _cost_of(events_b)
    sql = api.post("/v1/sql", json={"sql": "SELECT sum(cost_nanos) AS c FROM usage_events"},
                   headers=bearer(alice, org_b))  # fmt: skip
    assert sql.status_code == 200, sql.text
    assert str(_cost_of(events_b)) in sql.text
    # a viewer in B, an owner in A
    assert api.post("/v1/projects", json={"id": "pb", "name": "P"}, headers=bearer(alice, org_b)).status_code == 403
    assert api.post("/v1/projects", json={"id": "pa", "name": "P"}, headers=bearer(alice, org_a)).status_code == 201


def test_accept_invite_errors_name_the_field(api):
    owner = register(api, "inv@example.com")
    org = owner["org"]["id"]
    token = login(api, "inv@example.com")["access_token"]
    bad_role = api.post(
        f"/v1/orgs/{org}/invites", json={"email": "n@example.com", "role": "god"}, headers=bearer(token)
    )
    assert bad_role.status_code == 422 and bad_role.json()["field"] == "role"
    bad_email = api.post(f"/v1/orgs/{org}/invites", json={"email": "n", "role": "viewer"}, headers=bearer(token))
    assert bad_email.status_code == 422 and bad_email.json()["field"] == "email"
    invite = api.post(f"/v1/orgs/{org}/invites", json={"email": "new@example.com", "role": "member"},
                      headers=bearer(token)).json()  # fmt: skip
    no_name = api.post("/auth/accept-invite", json={"token": invite["token"], "password": PASSWORD})
    assert no_name.status_code == 422 and no_name.json()["field"] == "name"
    weak = api.post("/auth/accept-invite", json={"token": invite["token"], "password": "x", "name": "N"})
    assert weak.status_code == 422 and weak.json()["field"] == "password"
    forged = api.post("/auth/accept-invite", json={"token": invite["token"][:-3] + "abc", "password": PASSWORD,
                                                   "name": "N"})  # fmt: skip
    assert forged.status_code == 422 and forged.json()["field"] == "token"
    # an existing account joins with its own password, not a new one
    register(api, "exists@example.com")
    invite2 = api.post(f"/v1/orgs/{org}/invites", json={"email": "exists@example.com", "role": "member"},
                       headers=bearer(token)).json()  # fmt: skip
    wrong = api.post("/auth/accept-invite", json={"token": invite2["token"], "password": "not the password"})
    assert wrong.status_code == 422 and wrong.json()["field"] == "password"


def test_me_update_name_and_password(api):
    register(api, "me@example.com", "Old")
    first = login(api, "me@example.com")
    other = login(api, "me@example.com")
    h = bearer(first["access_token"])
    renamed = api.put("/auth/me", json={"name": "New"}, headers=h)
    assert renamed.status_code == 200 and renamed.json()["user"]["name"] == "New"
    no_current = api.put("/auth/me", json={"password": "a new password 1"}, headers=h)
    assert no_current.status_code == 422 and no_current.json()["field"] == "current_password"
    wrong = api.put("/auth/me", json={"password": "a new password 1", "current_password": "nope"}, headers=h)
    assert wrong.status_code == 422 and wrong.json()["field"] == "current_password"
    changed = api.put("/auth/me", json={"password": "a new password 1", "current_password": PASSWORD}, headers=h)
    assert changed.status_code == 200, changed.text
    # the other session ends, this one goes on; the old password no longer works
    assert api.get("/auth/me", headers=bearer(other["access_token"])).status_code == 401
    assert api.post("/auth/refresh", json={"refresh_token": other["refresh_token"]}).status_code == 401
    assert api.get("/auth/me", headers=h).json()["user"]["name"] == "New"
    assert api.post("/auth/login", json={"email": "me@example.com", "password": PASSWORD}).status_code == 401
    login(api, "me@example.com", "a new password 1")


def test_api_keys_still_work_beside_user_tokens(server, api):
    """The bootstrap/API-key path is unchanged, and an admin key manages its own org's members."""
    owner = register(api, "keys@example.com")
    org = owner["org"]["id"]
    boss = login(api, "keys@example.com")["access_token"]
    created = api.post("/v1/keys", json={"scopes": ["read", "admin"]}, headers=bearer(boss))
    assert created.status_code == 201 and created.json()["tenant"] == org
    key = created.json()["key"]
    members = api.get(f"/v1/orgs/{org}/members", headers=bearer(key))
    assert members.status_code == 200 and len(members.json()["members"]) == 1
    other = register(api, "keys2@example.com")["org"]["id"]
    assert api.get(f"/v1/orgs/{other}/members", headers=bearer(key)).status_code == 403
    # a key acts as an admin: it may not make owners
    invite = api.post(f"/v1/orgs/{org}/invites", json={"email": "o@example.com", "role": "owner"}, headers=bearer(key))
    assert invite.status_code == 403


def test_cli_users_create_bootstraps_an_owner_of_an_existing_tenant(server, api):
    env = {**os.environ, **child_env(server.settings)}
    command = [sys.executable, "-m", "spendstream.cli", "users", "create", "--email", "Root@Example.com",
               "--org", "boot-tenant", "--role", "owner", "--password-stdin", "--json"]  # fmt: skip
    done = subprocess.run(command, input=PASSWORD + "\n", env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) | {"user_id": ""} == {
        "user_id": "", "email": "root@example.com", "org": "boot-tenant", "role": "owner", "created_user": True
    }  # fmt: skip
    token = login(api, "root@example.com")["access_token"]
    assert api.get("/auth/me", headers=bearer(token)).json()["orgs"] == [
        {"id": "boot-tenant", "name": "boot-tenant", "role": "owner"}
    ]
    weak = subprocess.run([*command[:6], "weak@example.com", *command[7:]], input="short\n", env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert weak.returncode == 2 and "at least 10" in weak.stderr


async def test_racing_rotations_of_one_refresh_token_revoke_the_session(server, api):
    """Two processes rotating one refresh token at once (no shared lock): ClickHouse has no
    compare-and-set, so each writes its child and reads back; two children of one token is reuse."""
    register(api, "race@example.com")
    token = login(api, "race@example.com")["refresh_token"]
    first, second = await get_async_client(server.settings), await get_async_client(server.settings)
    try:
        outcomes = await asyncio.gather(
            store.rotate_refresh_token(first, token), store.rotate_refresh_token(second, token)
        )
        kinds = sorted(o.outcome.value for o in outcomes)
        assert store.Rotation.REUSED.value in kinds and kinds != ["rotated", "rotated"], kinds
        assert await store.session_revoked(first, outcomes[0].session_id)
        for outcome in outcomes:
            if outcome.refresh_token:  # a winner's new token is dead too
                again = await store.rotate_refresh_token(first, outcome.refresh_token)
                assert again.outcome is store.Rotation.REVOKED
    finally:
        await first.close()
        await second.close()


def test_no_token_or_password_reaches_the_logs(api, caplog):
    caplog.set_level(logging.DEBUG)
    owner = register(api, "logs@example.com", password="log-secret-password-1")
    first = login(api, "logs@example.com", "log-secret-password-1")
    second = api.post("/auth/refresh", json={"refresh_token": first["refresh_token"]}).json()
    invite = api.post(f"/v1/orgs/{owner['org']['id']}/invites", json={"email": "l2@example.com", "role": "viewer"},
                      headers=bearer(second["access_token"])).json()  # fmt: skip
    api.post("/auth/accept-invite", json={"token": invite["token"], "password": "log-secret-password-2", "name": "L"})
    api.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})  # reuse
    api.post("/auth/login", json={"email": "logs@example.com", "password": "log-secret-password-3"})
    secrets = ["log-secret-password", first["access_token"], first["refresh_token"], second["access_token"],
               second["refresh_token"], invite["token"]]  # fmt: skip
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert not [s for s in secrets if s in text]


def test_a_short_jwt_secret_is_a_settings_error_naming_it():
    with pytest.raises(ValidationError, match="jwt_secret"):
        Settings(identity={"jwt_secret": "too short"})
    assert Settings(identity={"jwt_secret": "x" * 32}).identity.jwt_secret.get_secret_value() == "x" * 32


def test_members_manage_their_own_keys_and_only_those(server, api):
    owner = register(api, "keyowner@example.com")
    org = owner["org"]["id"]
    boss = login(api, "keyowner@example.com")["access_token"]
    invite_and_accept(api, boss, org, "keymember@example.com", "member")
    invite_and_accept(api, boss, org, "keyviewer@example.com", "viewer")
    member = login(api, "keymember@example.com")["access_token"]
    viewer = login(api, "keyviewer@example.com")["access_token"]
    boss_key = api.post("/v1/keys", json={"scopes": ["read"], "name": "boss"}, headers=bearer(boss)).json()

    mine = api.post("/v1/keys", json={"scopes": ["ingest", "read"], "name": "mine"}, headers=bearer(member))
    assert mine.status_code == 201, mine.text
    assert mine.json()["tenant"] == org and mine.json()["scopes"] == ["ingest", "read"]
    too_much = api.post("/v1/keys", json={"scopes": ["read", "admin"]}, headers=bearer(member))
    assert too_much.status_code == 403 and too_much.json()["field"] == "scopes"
    assert api.post("/v1/keys", json={"scopes": ["keys"]}, headers=bearer(member)).status_code == 403
    listed = api.get("/v1/keys", headers=bearer(member)).json()["keys"]
    assert [k["id"] for k in listed] == [mine.json()["id"]]
    # the new key reads, and the owner sees every key
    assert _overview(api, bearer(mine.json()["key"])).status_code == 200
    assert {mine.json()["id"], boss_key["id"]} <= {
        k["id"] for k in api.get("/v1/keys", headers=bearer(boss)).json()["keys"]
    }
    # another's key is not the member's to revoke; their own is
    assert api.delete(f"/v1/keys/{boss_key['id']}", headers=bearer(member)).status_code == 404
    assert api.delete(f"/v1/keys/{mine.json()['id']}", headers=bearer(member)).status_code == 204
    assert _overview(api, bearer(mine.json()["key"])).status_code == 401
    # viewers read only
    assert api.get("/v1/keys", headers=bearer(viewer)).status_code == 403
    assert api.post("/v1/keys", json={"scopes": ["read"]}, headers=bearer(viewer)).status_code == 403
    audit = api.get(f"/v1/orgs/{org}/audit", headers=bearer(boss)).json()["events"]
    member_id = api.get("/auth/me", headers=bearer(member)).json()["user"]["id"]
    assert {(e["action"], e["target"]) for e in audit if e["actor_id"] == member_id} >= {
        ("key_create", mine.json()["id"]),
        ("key_revoke", mine.json()["id"]),
    }


async def test_expired_sessions_and_invites_are_refused(server, api):
    owner = register(api, "expiry@example.com")
    client = await get_async_client(server.settings)
    try:
        session_id, refresh = await store.create_session(client, owner["user"]["id"], ttl_s=-1)
        assert (await store.rotate_refresh_token(client, refresh)).outcome is store.Rotation.EXPIRED
        invite = await store.create_invite(client, owner["org"]["id"], "late@example.com", "viewer", "x", ttl_s=-1)
        assert await store.invite_by_token(client, invite["token"]) is None
    finally:
        await client.close()
    answer = api.post("/auth/refresh", json={"refresh_token": refresh})
    assert answer.status_code == 401 and "expired" in answer.json()["message"]
    late = api.post("/auth/accept-invite", json={"token": invite["token"], "password": PASSWORD, "name": "L"})
    assert late.status_code == 422 and late.json()["field"] == "token"


async def test_a_hash_made_at_another_cost_is_upgraded_at_login(server, api):
    registered = register(api, "rehash@example.com")
    old_hash = Passwords(time_cost=2, memory_kib=2048, parallelism=1).hash(PASSWORD)
    client = await get_async_client(server.settings)
    try:
        user = await store.user_by_id(client, registered["user"]["id"])
        await store.insert_user(client, {**user, "password_hash": old_hash})
        login(api, "rehash@example.com")
        upgraded = (await store.user_by_id(client, registered["user"]["id"]))["password_hash"]
    finally:
        await client.close()
    assert upgraded != old_hash and "$m=1024,t=1,p=1$" in upgraded
    login(api, "rehash@example.com")


def test_an_invite_is_e_mailed_when_smtp_is_configured(make_settings):
    with Mailbox() as mailbox:
        settings = make_settings(
            identity=IDENTITY, notify={"smtp": {"host": "127.0.0.1", "port": mailbox.port, "from_address": "ss@x.test"}}
        )
        migrate(settings)
        with QueryApiServer(settings) as server, httpx.Client(base_url=server.url, timeout=60.0) as api:
            org = register(api, "mailer@example.com", "Mailer", org_name="Mail Org")["org"]["id"]
            boss = login(api, "mailer@example.com")["access_token"]
            invite = api.post(f"/v1/orgs/{org}/invites", json={"email": "to@example.com", "role": "viewer"},
                              headers=bearer(boss)).json()  # fmt: skip
    assert invite["emailed"] is True
    ((recipients, message),) = mailbox.messages
    assert recipients == ["to@example.com"] and message["From"] == "ss@x.test"
    text = message.get_payload(decode=True).decode()
    assert invite["token"] in text and "Mail Org" in text and "Mailer <mailer@example.com>" in text
    assert f"={invite['token']}" not in text and "://" not in text  # in the body, never in a link


def test_pending_invites_are_listed_without_tokens_and_can_be_withdrawn(api):
    org = register(api, "withdraw@example.com")["org"]["id"]
    boss = login(api, "withdraw@example.com")["access_token"]
    made = [
        api.post(f"/v1/orgs/{org}/invites", json={"email": f"w{i}@example.com", "role": "viewer"}, headers=bearer(boss))
        for i in range(2)
    ]
    listed = api.get(f"/v1/orgs/{org}/invites", headers=bearer(boss)).json()["invites"]
    assert {i["email"] for i in listed} == {"w0@example.com", "w1@example.com"}
    assert not any(m.json()["token"] in str(listed) for m in made) and "token_hash" not in str(listed)
    first = made[0].json()
    assert api.delete(f"/v1/orgs/{org}/invites/{first['id']}", headers=bearer(boss)).status_code == 204
    assert api.delete(f"/v1/orgs/{org}/invites/{first['id']}", headers=bearer(boss)).status_code == 404
    withdrawn = api.post("/auth/accept-invite", json={"token": first["token"], "password": PASSWORD, "name": "W"})
    assert withdrawn.status_code == 422 and withdrawn.json()["field"] == "token"
    assert [i["email"] for i in api.get(f"/v1/orgs/{org}/invites", headers=bearer(boss)).json()["invites"]] == [
        "w1@example.com"
    ]
