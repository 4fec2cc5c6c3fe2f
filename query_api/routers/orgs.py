"""Organisations: members (list, role changes, removal), invites and the audit log.

An organisation is a tenant; ``{org_id}`` in the path must be the caller's: a person's access
token acts in the organisation of the path (the request guard resolves their role there, 403 if
they are not a member), an API key only in its own tenant. Reading members takes the ``read``
scope, changing them ``admin`` (roles owner and admin), and only an owner may grant, change or
remove the owner role; an organisation always keeps one owner. Changes apply to this process at
once and to the others within ``identity.cache_refresh_s``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from query_api.deps import Admin, Principal, Reader
from query_api.errors import Conflict, Forbidden, InvalidField, NotFound
from query_api.identity import Identity
from spendstream.identity import mail, store
from spendstream.identity.accounts import InvalidAccountField, normalize_email
from spendstream.identity.roles import InvalidRole, may_assign, parse_role
from spendstream.timeutil import iso_utc

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/orgs", tags=["organisations"])


class InviteIn(BaseModel):
    email: str = Field(max_length=320)
    role: str = Field(max_length=32, description="owner, admin, member or viewer")


class RoleIn(BaseModel):
    role: str = Field(max_length=32, description="owner, admin, member or viewer")


def _identity(request: Request) -> Identity:
    return request.app.state.identity


def _own_org(principal: Principal, org_id: str) -> None:
    if principal.tenant != org_id:
        raise Forbidden(f"your credential belongs to organisation {principal.tenant!r}, not {org_id[:128]!r}")


def _actor_role(principal: Principal) -> str:
    return principal.role or "admin"  # an API key with the admin scope acts as an admin


def _role(value: str) -> str:
    try:
        return parse_role(value)
    except InvalidRole as exc:
        raise InvalidField("role", str(exc)) from None


async def _member_views(ch: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    users = await store.users_by_ids(ch, [r["user_id"] for r in rows])
    return [
        {
            "user_id": r["user_id"],
            "email": users.get(r["user_id"], {}).get("email", ""),
            "name": users.get(r["user_id"], {}).get("name", ""),
            "role": r["role"],
            "since": iso_utc(r["created_at"]),
        }
        for r in rows
    ]


async def _existing_member(ch: Any, org_id: str, user_id: str) -> dict[str, Any]:
    row = await store.member(ch, org_id, user_id)
    if row is None:
        raise NotFound(f"member {user_id[:128]!r} of organisation {org_id[:128]!r}")
    return row


async def _keep_an_owner(ch: Any, org_id: str, row: dict[str, Any], new_role: str | None) -> None:
    if row["role"] == "owner" and new_role != "owner":
        owners = [m for m in await store.members_of(ch, org_id) if m["role"] == "owner"]
        if len(owners) <= 1:
            raise Conflict("an organisation keeps at least one owner: make someone else owner first", "role")


@router.get("/{org_id}/members", summary="Members of the organisation with their roles")
async def list_members(org_id: str, principal: Reader, request: Request) -> dict:
    _own_org(principal, org_id)
    ch = request.app.state.ch
    return {"members": await _member_views(ch, await store.members_of(ch, org_id))}


@router.get("/{org_id}/members/{user_id}", summary="One member")
async def get_member(org_id: str, user_id: str, principal: Reader, request: Request) -> dict:
    _own_org(principal, org_id)
    ch = request.app.state.ch
    return (await _member_views(ch, [await _existing_member(ch, org_id, user_id)]))[0]


@router.put("/{org_id}/members/{user_id}", summary="Change a member's role (admin); applies within seconds")
async def change_role(org_id: str, user_id: str, body: RoleIn, principal: Admin, request: Request) -> dict:
    _own_org(principal, org_id)
    role = _role(body.role)
    ch, identity = request.app.state.ch, _identity(request)
    row = await _existing_member(ch, org_id, user_id)
    refusal = may_assign(_actor_role(principal), row["role"], role)
    if refusal:
        raise Forbidden(refusal)
    await _keep_an_owner(ch, org_id, row, role)
    await store.set_member(ch, org_id, user_id, role, created_at=row["created_at"])
    await identity.cache.reload_after_write()
    identity.audit.record(
        "member_role", "ok", org=org_id, actor_id=principal.user_id or principal.key_id, target=user_id,
        detail=f"{row['role']}->{role}", ip=request.client.host if request.client else "",
    )  # fmt: skip
    return (await _member_views(ch, [{**row, "role": role}]))[0]


@router.delete(
    "/{org_id}/members/{user_id}", status_code=204, summary="Remove a member (admin); applies within seconds"
)
async def remove_member(org_id: str, user_id: str, principal: Admin, request: Request) -> Response:
    _own_org(principal, org_id)
    ch, identity = request.app.state.ch, _identity(request)
    row = await _existing_member(ch, org_id, user_id)
    refusal = may_assign(_actor_role(principal), row["role"], None)
    if refusal:
        raise Forbidden(refusal)
    await _keep_an_owner(ch, org_id, row, None)
    await store.set_member(ch, org_id, user_id, row["role"], created_at=row["created_at"], deleted=True)
    await identity.cache.reload_after_write()
    identity.audit.record(
        "member_remove", "ok", org=org_id, actor_id=principal.user_id or principal.key_id, target=user_id,
        detail=f"was {row['role']}", ip=request.client.host if request.client else "",
    )  # fmt: skip
    return Response(status_code=204)


@router.post("/{org_id}/invites", status_code=201, summary="Invite someone by e-mail (admin); the token is shown once")
async def invite(org_id: str, body: InviteIn, principal: Admin, request: Request) -> dict:
    _own_org(principal, org_id)
    try:
        email = normalize_email(body.email)
    except InvalidAccountField as exc:
        raise InvalidField(exc.field, exc.message) from None
    role = _role(body.role)
    refusal = may_assign(_actor_role(principal), None, role)
    if refusal:
        raise Forbidden(refusal)
    ch, identity = request.app.state.ch, _identity(request)
    settings = identity.settings
    created = await store.create_invite(
        ch, org_id, email, role, principal.user_id or principal.key_id, settings.identity.invite_ttl_s
    )
    emailed = False
    if settings.notify.smtp.host:
        orgs = await store.orgs_by_ids(ch, [org_id])
        inviter = await store.user_by_id(ch, principal.user_id) if principal.user_id else None
        message = mail.invite_message(
            email, orgs[org_id]["name"] if org_id in orgs else org_id,
            f"{inviter['name']} <{inviter['email']}>" if inviter else "An administrator", role, created["token"],
            created["expires_at"], settings.notify.smtp.from_address,
        )  # fmt: skip
        try:
            await asyncio.to_thread(mail.send, settings, message)
            emailed = True
        except Exception as exc:  # the invite stands; the inviter passes the token on themselves
            log.warning("invite e-mail to organisation %s not sent: %s", org_id, type(exc).__name__)
    identity.audit.record(
        "invite", "ok", org=org_id, actor_id=principal.user_id or principal.key_id, target=created["id"],
        detail=f"email={email} role={role}", ip=request.client.host if request.client else "",
    )  # fmt: skip
    return {
        "id": created["id"], "token": created["token"], "expires_at": iso_utc(created["expires_at"]),
        "email": email, "role": role, "emailed": emailed,
    }  # fmt: skip


@router.get("/{org_id}/invites", summary="Pending invites (admin); their tokens are never shown again")
async def list_invites(org_id: str, principal: Admin, request: Request) -> dict:
    _own_org(principal, org_id)
    rows = await store.pending_invites(request.app.state.ch, org_id)
    return {
        "invites": [
            {"id": r["id"], "email": r["email"], "role": r["role"], "invited_by": r["invited_by"],
             "created_at": iso_utc(r["created_at"]), "expires_at": iso_utc(r["expires_at"])}
            for r in rows
        ]
    }  # fmt: skip


@router.delete("/{org_id}/invites/{invite_id}", status_code=204, summary="Withdraw a pending invite (admin)")
async def withdraw_invite(org_id: str, invite_id: str, principal: Admin, request: Request) -> Response:
    _own_org(principal, org_id)
    if not await store.revoke_invite(request.app.state.ch, org_id, invite_id):
        raise NotFound(f"pending invite {invite_id[:64]!r}")
    _identity(request).audit.record(
        "invite_withdraw", "ok", org=org_id, actor_id=principal.user_id or principal.key_id, target=invite_id,
        ip=request.client.host if request.client else "",
    )  # fmt: skip
    return Response(status_code=204)


@router.get("/{org_id}/audit", summary="The organisation's audit log, newest first (admin)")
async def audit(org_id: str, principal: Admin, request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict:
    _own_org(principal, org_id)
    identity = _identity(request)
    await identity.audit.flush()
    rows = await store.audit_rows(request.app.state.ch, org_id, limit)
    return {"events": [{**r, "at": iso_utc(r["at"])} for r in rows]}
