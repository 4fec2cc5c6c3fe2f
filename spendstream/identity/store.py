"""The identity tables of migration 0011 in ClickHouse (async clickhouse-connect client).

Configuration-like rows (users, orgs, org_members, invites) follow the ReplacingMergeTree
pattern of 0004: a change inserts the whole row with a higher version, reads use FINAL.
Sessions, refresh tokens and revocations are append-only, so nothing can un-revoke a session.
Rows are visible to reads as soon as their insert returns (the query API re-reads memberships
right after each change it makes).

ClickHouse has no unique constraints or compare-and-set, so the two races that matter are
settled by writing first and reading back: two registrations of one e-mail both insert, and
the earliest (created_at, id) owns the address; two rotations of one refresh token both insert
a child, and a parent with two children is reuse (the session is revoked).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from spendstream.identity import tokens

_last_version = 0


def _version() -> int:
    """Microseconds of the wall clock, strictly increasing within this process."""
    global _last_version
    _last_version = max(_last_version + 1, time.time_ns() // 1_000)
    return _last_version


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime) -> datetime:
    """ClickHouse's DateTime64(3, 'UTC') may come back without its zone (EMBEDDED-STACK.md)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# ---------------------------------------------------------------- users

USER_COLUMNS = ("id", "email", "name", "password_hash", "created_at", "updated_at", "deleted", "version")


async def insert_user(ch: Any, user: dict[str, Any], deleted: bool = False) -> None:
    now = _now()
    row = {**user, "created_at": user.get("created_at") or now, "updated_at": now, "deleted": int(deleted),
           "version": _version()}  # fmt: skip
    await ch.insert("users", [[row[c] for c in USER_COLUMNS]], column_names=list(USER_COLUMNS))


async def user_by_email(ch: Any, email: str) -> dict[str, Any] | None:
    """The account of ``email``: its earliest live row (see the module docstring)."""
    result = await ch.query(
        "SELECT * FROM users FINAL WHERE email = {email:String} ORDER BY created_at, id LIMIT 1",
        parameters={"email": email},
    )
    rows = list(result.named_results())
    return rows[0] if rows else None


async def user_by_id(ch: Any, user_id: str) -> dict[str, Any] | None:
    result = await ch.query("SELECT * FROM users FINAL WHERE id = {id:String}", parameters={"id": user_id})
    rows = list(result.named_results())
    return rows[0] if rows else None


async def users_by_ids(ch: Any, user_ids: list[str]) -> dict[str, dict[str, Any]]:
    if not user_ids:
        return {}
    result = await ch.query(
        "SELECT * FROM users FINAL WHERE id IN {ids:Array(String)}", parameters={"ids": list(user_ids)}
    )
    return {row["id"]: row for row in result.named_results()}


async def claim_email(ch: Any, user: dict[str, Any]) -> bool:
    """Insert ``user`` and keep it only if it owns its e-mail address; False (and the row deleted)
    when another account has it."""
    await insert_user(ch, user)
    owner = await user_by_email(ch, user["email"])
    if owner is not None and owner["id"] == user["id"]:
        return True
    await insert_user(ch, user, deleted=True)
    return False


# ---------------------------------------------------------------- organisations and members

ORG_COLUMNS = ("id", "name", "created_by", "created_at", "updated_at", "deleted", "version")
MEMBER_COLUMNS = ("org", "user_id", "role", "created_at", "updated_at", "deleted", "version")


async def insert_org(ch: Any, org_id: str, name: str, created_by: str) -> None:
    now = _now()
    await ch.insert("orgs", [[org_id, name, created_by, now, now, 0, _version()]], column_names=list(ORG_COLUMNS))


async def orgs_by_ids(ch: Any, org_ids: list[str]) -> dict[str, dict[str, Any]]:
    if not org_ids:
        return {}
    result = await ch.query(
        "SELECT * FROM orgs FINAL WHERE id IN {ids:Array(String)}", parameters={"ids": list(org_ids)}
    )
    return {row["id"]: row for row in result.named_results()}


async def set_member(
    ch: Any, org: str, user_id: str, role: str, created_at: datetime | None = None, deleted: bool = False
) -> None:
    now = _now()
    await ch.insert(
        "org_members",
        [[org, user_id, role, created_at or now, now, int(deleted), _version()]],
        column_names=list(MEMBER_COLUMNS),
    )


async def members_of(ch: Any, org: str) -> list[dict[str, Any]]:
    result = await ch.query(
        "SELECT * FROM org_members FINAL WHERE org = {org:String} ORDER BY created_at, user_id",
        parameters={"org": org},
    )
    return list(result.named_results())


async def member(ch: Any, org: str, user_id: str) -> dict[str, Any] | None:
    result = await ch.query(
        "SELECT * FROM org_members FINAL WHERE org = {org:String} AND user_id = {user:String}",
        parameters={"org": org, "user": user_id},
    )
    rows = list(result.named_results())
    return rows[0] if rows else None


async def memberships_of(ch: Any, user_id: str) -> list[dict[str, Any]]:
    result = await ch.query(
        "SELECT * FROM org_members FINAL WHERE user_id = {user:String} ORDER BY created_at, org",
        parameters={"user": user_id},
    )
    return list(result.named_results())


# ---------------------------------------------------------------- invites

INVITE_COLUMNS = (
    "org", "id", "email", "role", "token_hash", "invited_by", "created_at", "expires_at", "accepted_at",
    "accepted_by", "deleted", "version",
)  # fmt: skip


async def create_invite(ch: Any, org: str, email: str, role: str, invited_by: str, ttl_s: int) -> dict[str, Any]:
    """A new invite; the returned dict holds the token, which is stored only as its hash."""
    invite_id = tokens.new_id()
    token = tokens.new_invite_token(invite_id)
    now = _now()
    row = {
        "org": org, "id": invite_id, "email": email, "role": role, "token_hash": tokens.token_hash(token),
        "invited_by": invited_by, "created_at": now, "expires_at": now + timedelta(seconds=ttl_s),
        "accepted_at": None, "accepted_by": "", "deleted": 0, "version": _version(),
    }  # fmt: skip
    await ch.insert("invites", [[row[c] for c in INVITE_COLUMNS]], column_names=list(INVITE_COLUMNS))
    return {**row, "token": token}


async def invite_by_token(ch: Any, token: str) -> dict[str, Any] | None:
    """The live, unaccepted, unexpired invite of ``token``, else None."""
    invite_id = tokens.parse_invite_token(token)
    if invite_id is None:
        return None
    result = await ch.query("SELECT * FROM invites FINAL WHERE id = {id:String}", parameters={"id": invite_id})
    rows = list(result.named_results())
    if not rows or not tokens.same_hash(rows[0]["token_hash"], tokens.token_hash(token)):
        return None
    invite = rows[0]
    if invite["accepted_at"] is not None or _aware(invite["expires_at"]) <= _now():
        return None
    return invite


async def pending_invites(ch: Any, org: str) -> list[dict[str, Any]]:
    """The organisation's live invites not yet accepted nor expired, newest first."""
    result = await ch.query(
        "SELECT * FROM invites FINAL WHERE org = {org:String} AND accepted_at IS NULL AND expires_at > now64(3) "
        "ORDER BY created_at DESC",
        parameters={"org": org},
    )
    return list(result.named_results())


async def revoke_invite(ch: Any, org: str, invite_id: str) -> bool:
    """Delete a pending invite; False when the organisation has no such pending invite."""
    for invite in await pending_invites(ch, org):
        if invite["id"] == invite_id:
            row = {**invite, "deleted": 1, "version": _version()}
            await ch.insert("invites", [[row[c] for c in INVITE_COLUMNS]], column_names=list(INVITE_COLUMNS))
            return True
    return False


async def mark_invite_accepted(ch: Any, invite: dict[str, Any], user_id: str) -> None:
    row = {**invite, "accepted_at": _now(), "accepted_by": user_id, "version": _version()}
    await ch.insert("invites", [[row[c] for c in INVITE_COLUMNS]], column_names=list(INVITE_COLUMNS))


# ---------------------------------------------------------------- sessions and refresh tokens


async def create_session(ch: Any, user_id: str, ttl_s: int, ip: str = "", user_agent: str = "") -> tuple[str, str]:
    """A new login session and its first refresh token: ``(session id, refresh token)``."""
    session_id = tokens.new_id()
    now = _now()
    expires = now + timedelta(seconds=ttl_s)
    await ch.insert(
        "auth_sessions",
        [[session_id, user_id, now, expires, ip[:64], user_agent[:256]]],
        column_names=["id", "user_id", "created_at", "expires_at", "ip", "user_agent"],
    )
    token = await _add_refresh_token(ch, session_id, "", expires)
    return session_id, token


async def _add_refresh_token(ch: Any, session_id: str, parent_id: str, expires: datetime) -> str:
    token_id, token = tokens.new_refresh_token(session_id)
    await ch.insert(
        "refresh_tokens",
        [[session_id, token_id, parent_id, tokens.token_hash(token), _now(), expires]],
        column_names=["session_id", "id", "parent_id", "token_hash", "created_at", "expires_at"],
    )
    return token


class Rotation(Enum):
    ROTATED = "rotated"
    INVALID = "invalid"  # not a token we issued (or not this one's secret)
    EXPIRED = "expired"
    REVOKED = "revoked"  # the session was revoked before
    REUSED = "reused"  # an already rotated token came back: the session is revoked now


@dataclass(frozen=True, slots=True)
class RotationResult:
    outcome: Rotation
    session_id: str = ""
    user_id: str = ""
    refresh_token: str = ""


async def session_revoked(ch: Any, session_id: str) -> bool:
    result = await ch.query(
        "SELECT count() FROM session_revocations WHERE session_id = {sid:String}", parameters={"sid": session_id}
    )
    return int(result.result_rows[0][0]) > 0


async def session_of_refresh_token(ch: Any, token: str) -> tuple[str, str] | None:
    """(session id, user id) when ``token`` is one this server issued (rotated or not), else None."""
    parsed = tokens.parse_refresh_token(token)
    if parsed is None:
        return None
    session_id, token_id = parsed
    result = await ch.query(
        "SELECT t.token_hash, s.user_id FROM refresh_tokens AS t INNER JOIN auth_sessions AS s ON s.id = t.session_id "
        "WHERE t.session_id = {sid:String} AND t.id = {tid:String} AND s.id = {sid:String}",
        parameters={"sid": session_id, "tid": token_id},
    )
    for stored_hash, user_id in result.result_rows:
        if tokens.same_hash(stored_hash, tokens.token_hash(token)):
            return session_id, user_id
    return None


async def rotate_refresh_token(ch: Any, token: str) -> RotationResult:
    """Trade ``token`` for the next one of its session (see the module docstring for reuse)."""
    found = await session_of_refresh_token(ch, token)
    if found is None:
        return RotationResult(Rotation.INVALID)
    session_id, user_id = found
    _, token_id = tokens.parse_refresh_token(token)  # type: ignore[misc]
    if await session_revoked(ch, session_id):
        return RotationResult(Rotation.REVOKED, session_id, user_id)
    result = await ch.query(
        "SELECT count() FROM refresh_tokens WHERE session_id = {sid:String} AND parent_id = {tid:String}",
        parameters={"sid": session_id, "tid": token_id},
    )
    children = int(result.result_rows[0][0])
    if children:
        await revoke_session(ch, session_id, user_id, "refresh_token_reuse")
        return RotationResult(Rotation.REUSED, session_id, user_id)
    session = await ch.query(
        "SELECT expires_at FROM auth_sessions WHERE id = {sid:String}", parameters={"sid": session_id}
    )
    expires = _aware(session.result_rows[0][0])
    if expires <= _now():
        return RotationResult(Rotation.EXPIRED, session_id, user_id)
    new_token = await _add_refresh_token(ch, session_id, token_id, expires)
    # two rotations of one token racing (in different processes) both get here: read back
    result = await ch.query(
        "SELECT count() FROM refresh_tokens WHERE session_id = {sid:String} AND parent_id = {tid:String}",
        parameters={"sid": session_id, "tid": token_id},
    )
    if int(result.result_rows[0][0]) > 1:
        await revoke_session(ch, session_id, user_id, "refresh_token_reuse")
        return RotationResult(Rotation.REUSED, session_id, user_id)
    return RotationResult(Rotation.ROTATED, session_id, user_id, new_token)


async def revoke_session(ch: Any, session_id: str, user_id: str, reason: str) -> None:
    await ch.insert(
        "session_revocations",
        [[session_id, user_id, reason, _now()]],
        column_names=["session_id", "user_id", "reason", "revoked_at"],
    )


async def revoke_user_sessions(ch: Any, user_id: str, reason: str, keep: str = "") -> list[str]:
    """Revoke every live session of ``user_id`` but ``keep``; the ids revoked."""
    result = await ch.query(
        "SELECT id FROM auth_sessions WHERE user_id = {user:String} AND expires_at > now64(3) AND id != {keep:String} "
        "AND id NOT IN (SELECT session_id FROM session_revocations WHERE user_id = {user:String})",
        parameters={"user": user_id, "keep": keep},
    )
    ids = [row[0] for row in result.result_rows]
    if ids:
        now = _now()
        await ch.insert(
            "session_revocations",
            [[sid, user_id, reason, now] for sid in ids],
            column_names=["session_id", "user_id", "reason", "revoked_at"],
        )
    return ids


# ---------------------------------------------------------------- owners of API keys


def key_owner(principal: Any) -> str:
    """Who owns the keys a principal (spendstream.keys.Principal) creates: the person, else the key."""
    return principal.user_id or f"key:{principal.key_id}"


async def record_key_owner(ch: Any, tenant: str, owner: str, key_id: str) -> None:
    await ch.insert(
        "api_key_owners", [[tenant, owner, key_id, _now()]], column_names=["tenant", "owner", "key_id", "created_at"]
    )


async def owned_key_ids(ch: Any, tenant: str, owner: str) -> set[str]:
    result = await ch.query(
        "SELECT key_id FROM api_key_owners WHERE tenant = {tenant:String} AND owner = {owner:String}",
        parameters={"tenant": tenant, "owner": owner},
    )
    return {row[0] for row in result.result_rows}


# ---------------------------------------------------------------- what the query API keeps in memory


@dataclass(frozen=True, slots=True)
class Snapshot:
    memberships: dict[str, dict[str, str]]  # user id -> org -> role
    revoked_sessions: frozenset[str]


def snapshot_loader(get_ch: Callable[[], Any], revocations_horizon_s: float) -> Callable[[], Awaitable[Snapshot]]:
    """The ``load`` of an :class:`~spendstream.identity.cache.IdentityCache`: every membership,
    and the sessions revoked within ``revocations_horizon_s`` (older revocations can only concern
    access tokens that have expired anyway; refreshes check ClickHouse itself)."""

    async def load() -> Snapshot:
        ch = get_ch()
        members, revoked = await asyncio.gather(
            ch.query("SELECT user_id, org, role FROM org_members FINAL"),
            ch.query(
                "SELECT DISTINCT session_id FROM session_revocations "
                "WHERE revoked_at >= now64(3) - toIntervalSecond({horizon:UInt32})",
                parameters={"horizon": int(revocations_horizon_s)},
            ),
        )
        memberships: dict[str, dict[str, str]] = {}
        for user_id, org, role in members.result_rows:
            memberships.setdefault(user_id, {})[org] = role
        return Snapshot(memberships, frozenset(row[0] for row in revoked.result_rows))

    return load


# ---------------------------------------------------------------- audit log

AUDIT_COLUMNS = ("at", "org", "actor_id", "actor_email", "action", "outcome", "target", "detail", "ip", "user_agent")


class AuditLog:
    """``audit_log`` rows written in batches by one background task, so a flood of failed logins
    costs one insert per ``flush_s``, not one per attempt. Bounded: beyond ``max_pending`` rows
    waiting, new rows are dropped and counted in ``dropped``."""

    def __init__(
        self,
        get_ch: Callable[[], Any],
        flush_s: float = 0.5,
        max_pending: int = 10_000,
        on_record: Callable[[str, str], None] | None = None,
    ):
        self._get_ch = get_ch
        self._on_record = on_record
        self._flush_s = flush_s
        self._max_pending = max_pending
        self._pending: list[list[Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.dropped = 0
        self.failed = 0

    def record(
        self, action: str, outcome: str, *, org: str = "", actor_id: str = "", actor_email: str = "",
        target: str = "", detail: str = "", ip: str = "", user_agent: str = "",
    ) -> None:  # fmt: skip
        if self._on_record is not None:
            self._on_record(action, outcome)
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        self._pending.append(
            [_now(), org, actor_id, actor_email[:254], action, outcome, target[:256], detail[:512], ip[:64],
             user_agent[:256]]
        )  # fmt: skip

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="audit-log")

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            rows, self._pending = self._pending, []
            if not rows:
                return
            try:
                await self._get_ch().insert("audit_log", rows, column_names=list(AUDIT_COLUMNS))
            except Exception:  # ClickHouse down: keep the rows for the next flush, within the bound
                self.failed += 1
                self._pending = (rows + self._pending)[: self._max_pending]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.flush()


async def audit_rows(ch: Any, org: str, limit: int) -> list[dict[str, Any]]:
    result = await ch.query(
        "SELECT * FROM audit_log WHERE org = {org:String} ORDER BY at DESC LIMIT {limit:UInt32}",
        parameters={"org": org, "limit": limit},
    )
    return list(result.named_results())
