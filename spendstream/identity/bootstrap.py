"""``spendstream users create``: a person in an organisation with a role, without the API (the
first owner of a new installation, or of an existing tenant such as the bootstrap one)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from spendstream.identity import store
from spendstream.identity.accounts import InvalidAccountField, check_name, new_user_id, normalize_email
from spendstream.identity.passwords import PasswordPolicyError, Passwords, check_password
from spendstream.identity.roles import InvalidRole, parse_role
from spendstream.keys import InvalidKeyRequest, check_tenant
from spendstream.settings import Settings


class BootstrapError(ValueError):
    pass


async def create_user(
    settings: Settings, email: str, org: str, role: str, name: str, password: str | None, org_name: str = ""
) -> dict[str, Any]:
    """Create the user (or take the existing account of ``email``), the organisation if it is new,
    and give the user ``role`` in it. ``password`` is needed only for a new account."""
    from spendstream.clickhouse import get_async_client

    try:
        email, role, org = normalize_email(email), parse_role(role), check_tenant(org)
        name = check_name(name or email.partition("@")[0])
    except (InvalidAccountField, InvalidRole, InvalidKeyRequest) as exc:
        raise BootstrapError(str(exc)) from None
    ch = await get_async_client(settings)
    try:
        user = await store.user_by_email(ch, email)
        created_user = user is None
        if user is None:
            if not password:
                raise BootstrapError("a new account needs a password (--password-stdin or the prompt)")
            try:
                check_password(password, settings.identity.password_min_length, email)
            except PasswordPolicyError as exc:
                raise BootstrapError(str(exc)) from None
            hashed = await asyncio.to_thread(Passwords.from_settings(settings.identity).hash, password)
            user = {"id": new_user_id(), "email": email, "name": name, "password_hash": hashed}
            if not await store.claim_email(ch, user):
                raise BootstrapError(f"an account for {email} was created meanwhile; run again")
        orgs = await store.orgs_by_ids(ch, [org])
        if org not in orgs:
            await store.insert_org(ch, org, org_name or org, user["id"])
        existing = await store.member(ch, org, user["id"])
        await store.set_member(ch, org, user["id"], role, created_at=existing["created_at"] if existing else None)
    finally:
        await ch.close()
    return {"user_id": user["id"], "email": email, "org": org, "role": role, "created_user": created_user}


def cli_create(settings: Settings, email: str, org: str, role: str, name: str, password: str | None,
               org_name: str, as_json: bool) -> None:  # fmt: skip
    import typer

    try:
        result = asyncio.run(create_user(settings, email, org, role, name, password, org_name))
    except BootstrapError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # unreachable or unmigrated ClickHouse
        typer.echo(f"cannot write the user to ClickHouse at {settings.clickhouse_url}: {exc}", err=True)
        typer.echo("(is ClickHouse up, and has `spendstream migrate` run against it?)", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result))
    else:
        verb = "created" if result["created_user"] else "found"
        typer.echo(f"{verb} user {result['user_id']} ({result['email']}): {result['role']} of {result['org']}")
