"""People: register, log in, refresh, log out, the caller's profile, accepting an invite.

Outside ``/v1/`` (the request guard only bounds their bodies): these routes take an e-mail and
password, a refresh token or an invite token in the JSON body, never in the URL, and
``/auth/me`` / ``/auth/logout`` take the access token in ``Authorization: Bearer``. Tokens and
passwords are never logged; every attempt is written to ``audit_log``.

Login resists guessing: at most ``identity.login_attempts_per_ip`` attempts per IP and
``identity.login_failures_per_account`` failed ones per e-mail address within
``identity.login_window_s`` (then 429 with Retry-After, checked before any hashing), and an
unknown address costs the same argon2 verification as a wrong password.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from query_api.errors import Conflict, Forbidden, InvalidField, TooManyRequests, Unauthorized
from query_api.identity import Identity
from spendstream.identity import store
from spendstream.identity.accounts import InvalidAccountField, check_name, new_org_id, new_user_id, normalize_email
from spendstream.identity.passwords import HashPoolBusy, PasswordPolicyError, check_password
from spendstream.identity.tokens import AccessClaims, InvalidToken, looks_like_jwt, parse_refresh_token
from spendstream.timeutil import iso_utc

router = APIRouter(prefix="/auth", tags=["auth"])

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <access token>")


def get_identity(request: Request) -> Identity:
    return request.app.state.identity


IdentityDep = Annotated[Identity, Depends(get_identity)]


async def current_session(
    identity: IdentityDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> AccessClaims:
    """The claims of the caller's access token (not an API key: these routes are a person's)."""
    token = credentials.credentials if credentials else ""
    if not looks_like_jwt(token):
        raise Unauthorized("send Authorization: Bearer <access token> (from POST /auth/login)")
    try:
        claims = identity.access_tokens.verify(token)
    except InvalidToken as exc:
        raise Unauthorized(exc.message) from None
    if identity.cache.is_revoked(claims.session_id):
        raise Unauthorized("this session has ended (logged out or revoked); log in again")
    return claims


Session = Annotated[AccessClaims, Depends(current_session)]

# bodies: lengths are bounded here; what the values must look like is checked below, naming the field


class RegisterIn(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)
    name: str = Field(max_length=1024)
    org_name: str | None = Field(None, max_length=1024, description='default: "<name>\'s organisation"')


class LoginIn(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


class RefreshIn(BaseModel):
    refresh_token: str = Field(max_length=256)


class LogoutIn(BaseModel):
    refresh_token: str | None = Field(None, max_length=256)


class MeIn(BaseModel):
    name: str | None = Field(None, max_length=1024)
    password: str | None = Field(None, max_length=1024, description="a new password (needs current_password)")
    current_password: str | None = Field(None, max_length=1024)


class AcceptInviteIn(BaseModel):
    token: str = Field(max_length=256)
    password: str = Field(max_length=1024)
    name: str | None = Field(None, max_length=1024, description="required for a new account")


def _client(request: Request) -> tuple[str, str]:
    return (request.client.host if request.client else ""), request.headers.get("user-agent", "")[:256]


def _field(fn, *args: Any) -> Any:
    try:
        return fn(*args)
    except InvalidAccountField as exc:
        raise InvalidField(exc.field, exc.message) from None


def _password(password: str, identity: Identity, email: str, field: str = "password") -> str:
    try:
        return check_password(password, identity.settings.identity.password_min_length, email)
    except PasswordPolicyError as exc:
        raise InvalidField(field, str(exc)) from None


def _throttle_ip(identity: Identity, ip: str, count: bool = True) -> None:
    now = time.monotonic()
    wait = identity.attempts_per_ip.retry_after(ip, now)
    if wait:
        raise TooManyRequests(f"too many attempts from your address; retry in {wait} s", wait)
    if count:
        identity.attempts_per_ip.hit(ip, now)


async def _hash(identity: Identity, fn, *args: Any) -> Any:
    try:
        return await identity.hashes.run(fn, *args)
    except HashPoolBusy:
        raise TooManyRequests("the server is busy checking passwords; retry shortly", 1) from None


def user_view(user: dict[str, Any]) -> dict[str, Any]:
    return {"id": user["id"], "email": user["email"], "name": user["name"], "created_at": iso_utc(user["created_at"])}


async def _tokens(identity: Identity, request: Request, user_id: str) -> dict[str, Any]:
    ip, agent = _client(request)
    session_id, refresh = await store.create_session(
        request.app.state.ch, user_id, identity.settings.identity.refresh_ttl_s, ip, agent
    )
    return _token_body(identity, user_id, session_id, refresh)


def _token_body(identity: Identity, user_id: str, session_id: str, refresh: str) -> dict[str, Any]:
    return {
        "access_token": identity.access_tokens.issue(user_id, session_id),
        "refresh_token": refresh,
        "token_type": "bearer",
        "expires_in": identity.access_tokens.ttl_s,
    }


async def _orgs_view(ch: Any, memberships: dict[str, str]) -> list[dict[str, Any]]:
    orgs = await store.orgs_by_ids(ch, list(memberships))
    return [
        {"id": org, "name": orgs[org]["name"] if org in orgs else org, "role": role}
        for org, role in sorted(memberships.items())
    ]


@router.post("/register", status_code=201, summary="Create an account and a new organisation it owns")
async def register(body: RegisterIn, request: Request, identity: IdentityDep) -> dict:
    if not identity.settings.identity.allow_registration:
        raise Forbidden("registration is closed here: ask an admin of your organisation for an invite")
    email = _field(normalize_email, body.email)
    name = _field(check_name, body.name)
    org_name = _field(check_name, body.org_name, "org_name") if body.org_name is not None else f"{name}'s organisation"
    password = _password(body.password, identity, email)
    ip, agent = _client(request)
    _throttle_ip(identity, ip)
    password_hash = await _hash(identity, identity.passwords.hash, password)
    ch = request.app.state.ch
    user = {"id": new_user_id(), "email": email, "name": name, "password_hash": password_hash}
    async with identity.accounts_lock:
        if await store.user_by_email(ch, email) is not None or not await store.claim_email(ch, user):
            identity.audit.record("register", "conflict", actor_email=email, ip=ip, user_agent=agent)
            raise Conflict("an account with this e-mail address exists: log in, or accept an invite", "email")
    org_id = new_org_id()
    await store.insert_org(ch, org_id, org_name, user["id"])
    await store.set_member(ch, org_id, user["id"], "owner")
    await identity.cache.reload_after_write()
    identity.audit.record("register", "ok", org=org_id, actor_id=user["id"], actor_email=email, ip=ip, user_agent=agent)
    stored = await store.user_by_id(ch, user["id"])
    return {"user": user_view(stored or {**user, "created_at": None}), "org": {"id": org_id, "name": org_name,
                                                                             "role": "owner"}}  # fmt: skip


@router.post("/login", summary="Trade an e-mail address and password for an access and a refresh token")
async def login(body: LoginIn, request: Request, identity: IdentityDep) -> dict:
    ip, agent = _client(request)
    email = body.email.strip().lower()[:254]
    _throttle_ip(identity, ip)
    now = time.monotonic()
    wait = identity.failures_per_account.retry_after(email, now)
    if wait:
        identity.audit.record("login", "throttled", actor_email=email, ip=ip, user_agent=agent)
        raise TooManyRequests(f"too many failed logins for this account; retry in {wait} s", wait, "email")
    user = await store.user_by_email(request.app.state.ch, email)
    # an unknown address is verified against a dummy hash: the same work, the same answer
    ok = await _hash(identity, identity.passwords.verify, user["password_hash"] if user else None, body.password)
    if not ok or user is None:
        identity.failures_per_account.hit(email, time.monotonic())
        identity.audit.record(
            "login", "failed", actor_id=user["id"] if user else "", actor_email=email, ip=ip, user_agent=agent
        )
        raise Unauthorized("wrong e-mail address or password")
    identity.failures_per_account.reset(email)
    if identity.passwords.needs_rehash(user["password_hash"]):
        # made at another argon2 cost than today's settings: store a hash at today's cost
        try:
            rehashed = await _hash(identity, identity.passwords.hash, body.password)
            await store.insert_user(request.app.state.ch, {**user, "password_hash": rehashed})
        except TooManyRequests:
            pass  # busy: the next login does it
    identity.audit.record("login", "ok", actor_id=user["id"], actor_email=email, ip=ip, user_agent=agent)
    return await _tokens(identity, request, user["id"])


@router.post("/refresh", summary="Trade a refresh token for new tokens; the old refresh token stops working")
async def refresh(body: RefreshIn, request: Request, identity: IdentityDep) -> dict:
    ip, agent = _client(request)
    ch = request.app.state.ch
    # refreshing is free for clients holding real tokens; guessing counts against the address
    _throttle_ip(identity, ip, count=False)
    parsed = parse_refresh_token(body.refresh_token)
    if parsed is None:
        identity.attempts_per_ip.hit(ip, time.monotonic())
        raise Unauthorized("invalid refresh token")
    async with identity.session_lock(parsed[0]):
        result = await store.rotate_refresh_token(ch, body.refresh_token)
    outcome = result.outcome
    identity.audit.record(
        "refresh", outcome.value, actor_id=result.user_id, target=result.session_id, ip=ip, user_agent=agent
    )
    if outcome is store.Rotation.REUSED:
        identity.cache.mark_revoked(result.session_id)
        raise Unauthorized("this refresh token was already used: the session is revoked, log in again")
    if outcome is store.Rotation.INVALID:
        identity.attempts_per_ip.hit(ip, time.monotonic())
    if outcome is not store.Rotation.ROTATED:
        message = {
            store.Rotation.INVALID: "invalid refresh token",
            store.Rotation.EXPIRED: "the session has expired; log in again",
            store.Rotation.REVOKED: "this session has ended (logged out or revoked); log in again",
        }[outcome]
        raise Unauthorized(message)
    return _token_body(identity, result.user_id, result.session_id, result.refresh_token)


@router.post("/logout", status_code=204, summary="End the session of the access token (or of a refresh token)")
async def logout(
    request: Request,
    identity: IdentityDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    body: LogoutIn | None = None,
) -> Response:
    ip, agent = _client(request)
    ch = request.app.state.ch
    if body is not None and body.refresh_token:
        found = await store.session_of_refresh_token(ch, body.refresh_token)
        if found is None:
            raise Unauthorized("invalid refresh token")
        session_id, user_id = found
    else:
        claims = await current_session(identity, credentials)
        session_id, user_id = claims.session_id, claims.user_id
    await store.revoke_session(ch, session_id, user_id, "logout")
    identity.cache.mark_revoked(session_id)
    identity.audit.record("logout", "ok", actor_id=user_id, target=session_id, ip=ip, user_agent=agent)
    return Response(status_code=204)


@router.get("/me", summary="Your profile and your organisations with your role in each")
async def me(session: Session, request: Request, identity: IdentityDep) -> dict:
    ch = request.app.state.ch
    user = await store.user_by_id(ch, session.user_id)
    if user is None:
        raise Unauthorized("this account no longer exists")
    orgs = await _orgs_view(ch, await identity.cache.fresh_orgs_of(session.user_id, None))
    return {"user": user_view(user), "orgs": orgs}


@router.put("/me", summary="Change your name or password (a new password ends your other sessions)")
async def update_me(body: MeIn, session: Session, request: Request, identity: IdentityDep) -> dict:
    ip, agent = _client(request)
    ch = request.app.state.ch
    user = await store.user_by_id(ch, session.user_id)
    if user is None:
        raise Unauthorized("this account no longer exists")
    changed = dict(user)
    if body.name is not None:
        changed["name"] = _field(check_name, body.name)
    if body.password is not None:
        new_password = _password(body.password, identity, user["email"])
        if body.current_password is None:
            raise InvalidField("current_password", "changing the password needs current_password")
        _throttle_ip(identity, ip)
        if not await _hash(identity, identity.passwords.verify, user["password_hash"], body.current_password):
            identity.audit.record("password_change", "failed", actor_id=user["id"], ip=ip, user_agent=agent)
            raise InvalidField("current_password", "current_password is wrong")
        changed["password_hash"] = await _hash(identity, identity.passwords.hash, new_password)
    await store.insert_user(ch, changed)
    if body.password is not None:
        for revoked in await store.revoke_user_sessions(ch, user["id"], "password_change", keep=session.session_id):
            identity.cache.mark_revoked(revoked)
        identity.audit.record("password_change", "ok", actor_id=user["id"], ip=ip, user_agent=agent)
    return {"user": user_view(changed)}


@router.post("/accept-invite", summary="Join an organisation with an invite token (creating your account if new)")
async def accept_invite(body: AcceptInviteIn, request: Request, identity: IdentityDep) -> dict:
    ip, agent = _client(request)
    _throttle_ip(identity, ip)
    ch = request.app.state.ch
    async with identity.accounts_lock:
        invite = await store.invite_by_token(ch, body.token)
        if invite is None:
            identity.audit.record("accept_invite", "invalid", ip=ip, user_agent=agent)
            raise InvalidField("token", "invalid, expired or already used invite token")
        email = invite["email"]
        user = await store.user_by_email(ch, email)
        if user is not None:  # an existing account proves it is theirs with its password
            if not await _hash(identity, identity.passwords.verify, user["password_hash"], body.password):
                identity.failures_per_account.hit(email, time.monotonic())
                identity.audit.record("accept_invite", "failed", org=invite["org"], actor_email=email, ip=ip)
                raise InvalidField("password", "wrong password for the existing account of this e-mail address")
        else:
            if body.name is None:
                raise InvalidField("name", "a new account needs a name")
            name = _field(check_name, body.name)
            password = _password(body.password, identity, email)
            password_hash = await _hash(identity, identity.passwords.hash, password)
            user = {"id": new_user_id(), "email": email, "name": name, "password_hash": password_hash}
            if not await store.claim_email(ch, user):
                raise Conflict("an account with this e-mail address was just created; accept again with its password")
        existing = await store.member(ch, invite["org"], user["id"])
        role = (
            existing["role"]
            if existing and existing["deleted"] == 0 and existing["role"] == "owner"
            else invite["role"]
        )
        await store.set_member(ch, invite["org"], user["id"], role)
        await store.mark_invite_accepted(ch, invite, user["id"])
    await identity.cache.reload_after_write()
    identity.audit.record(
        "accept_invite", "ok", org=invite["org"], actor_id=user["id"], actor_email=email, target=invite["id"],
        detail=f"role={role}", ip=ip, user_agent=agent,
    )  # fmt: skip
    orgs = await store.orgs_by_ids(ch, [invite["org"]])
    stored = await store.user_by_id(ch, user["id"]) or {**user, "created_at": None}
    org_name = orgs[invite["org"]]["name"] if invite["org"] in orgs else invite["org"]
    return {"user": user_view(stored), "org": {"id": invite["org"], "name": org_name, "role": role}}
