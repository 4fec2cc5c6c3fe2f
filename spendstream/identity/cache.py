"""Memberships and revoked sessions in memory, and the check of a person's access token.

Like :class:`spendstream.keys.KeyStore` for API keys: nothing is read from ClickHouse per
request. The cache reloads every ``identity.cache_refresh_s`` and keeps serving the last good
snapshot while ClickHouse is down; a user asking for an organisation the snapshot does not give
them triggers an early reload (at most once per ``miss_reload_s``), so a membership just made in
another process works at once. The process that changes a membership or revokes a session
applies it to its own cache at once (``reload`` / ``mark_revoked``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from spendstream.identity.roles import scopes_of
from spendstream.identity.store import Snapshot
from spendstream.identity.tokens import AccessTokens, InvalidToken
from spendstream.keys import AuthError, Principal
from spendstream.reloading import Reloader

log = logging.getLogger(__name__)

ORG_HEADER = "X-Org-Id"


class IdentityCache:
    def __init__(
        self,
        load: Callable[[], Awaitable[Snapshot]],
        *,
        refresh_s: float = 1.0,
        miss_reload_s: float = 0.5,
        miss_wait_s: float = 2.0,
    ) -> None:
        self._load = load
        self._memberships: dict[str, dict[str, str]] = {}
        self._revoked: set[str] = set()
        self._revoked_here: dict[str, float] = {}  # revoked by this process, until a load shows them
        self._reloader = Reloader(
            self._reload_once,
            name="identity-refresh",
            refresh_s=refresh_s,
            miss_reload_s=miss_reload_s,
            miss_wait_s=miss_wait_s,
        )
        self._healthy = True
        self.loaded = False

    async def start(self) -> None:
        await self._reloader.start()

    async def close(self) -> None:
        await self._reloader.close()

    async def reload(self) -> None:
        """Reload now, or join a reload already running. Failures keep the last good snapshot."""
        await self._reloader.reload()

    async def reload_after_write(self) -> None:
        """Reload so that a write that just returned is seen (a reload already running may have
        read before it)."""
        await self._reloader.reload_after_write()

    async def _reload_once(self) -> None:
        started = time.monotonic()
        try:
            snapshot = await self._load()
        except Exception as exc:  # ClickHouse down or not migrated: keep what we have
            log.log(logging.WARNING if self._healthy else logging.DEBUG, "identity reload failed: %s", exc)
            self._healthy = False
            return
        self._healthy = True
        self._memberships = snapshot.memberships
        # a session this process revoked after the load began may be missing from it: keep it
        self._revoked_here = {s: t for s, t in self._revoked_here.items() if t >= started - 60}
        self._revoked = set(snapshot.revoked_sessions) | self._revoked_here.keys()
        self.loaded = True

    def mark_revoked(self, session_id: str) -> None:
        self._revoked.add(session_id)
        self._revoked_here[session_id] = time.monotonic()

    def is_revoked(self, session_id: str) -> bool:
        return session_id in self._revoked

    def orgs_of(self, user_id: str) -> dict[str, str]:
        """org -> role of ``user_id`` as of the last load."""
        return dict(self._memberships.get(user_id, {}))

    async def fresh_orgs_of(self, user_id: str, wanted: str | None) -> dict[str, str]:
        """``orgs_of``, reloaded first (rate-limited) when it lacks ``wanted`` or is empty."""
        orgs = self._memberships.get(user_id, {})
        if (wanted in orgs) if wanted else orgs:
            return dict(orgs)
        await self._reloader.reload_on_miss()
        return self.orgs_of(user_id)


async def authenticate_user(
    cache: IdentityCache, access_tokens: AccessTokens, token: str, org_header: str | None, org_in_path: str | None
) -> Principal:
    """The principal of a person's access token acting in one organisation: the one named by the
    path (``/v1/orgs/{id}/...``) or the ``X-Org-Id`` header, else the user's only organisation.
    AuthError: 401 for a bad, expired or revoked token; 403 when the user is not a member of that
    organisation (whatever ``X-Org-Id`` claims); 400 naming ``X-Org-Id`` when it is needed."""
    try:
        claims = access_tokens.verify(token)
    except InvalidToken as exc:
        raise AuthError(401, exc.message) from None
    if cache.is_revoked(claims.session_id):
        raise AuthError(401, "this session has ended (logged out or revoked); log in again")
    header = (org_header or "").strip() or None
    if header is not None and org_in_path is not None and header != org_in_path:
        raise AuthError(400, f"{ORG_HEADER} names another organisation than the path", ORG_HEADER)
    org = org_in_path or header
    orgs = await cache.fresh_orgs_of(claims.user_id, org)
    if org is None:
        if len(orgs) == 1:
            org = next(iter(orgs))
        elif not orgs:
            raise AuthError(403, "you are not a member of any organisation")
        else:
            raise AuthError(
                400, f"you belong to several organisations: name one in the {ORG_HEADER} header", ORG_HEADER
            )
    role = orgs.get(org)
    if role is None:
        raise AuthError(403, f"you are not a member of organisation {org[:128]!r}")
    user_id = claims.user_id
    return Principal(f"user:{user_id}", org, scopes_of(role), f"user {user_id}", user_id, claims.session_id, role)
