"""What the query API keeps for people and login (``app.state.identity``), built by the lifespan:
the membership cache, the access-token codec, the password hasher and its bounded pool, the login
limits and the audit log writer. See spendstream/identity/ for each part."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spendstream.identity.cache import IdentityCache
from spendstream.identity.passwords import HashPool, Passwords
from spendstream.identity.store import AuditLog, snapshot_loader
from spendstream.identity.throttle import SlidingWindow
from spendstream.identity.tokens import AccessTokens
from spendstream.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Identity:
    settings: Settings
    cache: IdentityCache
    access_tokens: AccessTokens
    passwords: Passwords
    hashes: HashPool
    audit: AuditLog
    failures_per_account: SlidingWindow
    attempts_per_ip: SlidingWindow
    #: one lock for account creation and invite acceptance in this process (see store.claim_email
    #: for what settles the race between processes)
    accounts_lock: asyncio.Lock
    #: refresh rotations of one session run one at a time in this process
    session_locks: tuple[asyncio.Lock, ...]

    @classmethod
    async def start(cls, settings: Settings, get_ch: Callable[[], Any], metrics: Any = None) -> Identity:
        cfg = settings.identity
        if not cfg.jwt_secret.get_secret_value():
            log.warning(
                "identity.jwt_secret is empty: access tokens are signed with a random key of this process "
                "(set SPENDSTREAM_IDENTITY__JWT_SECRET for more than one process or restarts)"
            )
        cache = IdentityCache(snapshot_loader(get_ch, cfg.access_ttl_s + 120), refresh_s=cfg.cache_refresh_s)
        # the dummy hash for unknown accounts costs one hash: made off the event loop
        passwords, _ = await asyncio.gather(asyncio.to_thread(Passwords.from_settings, cfg), cache.start())
        count = (lambda action, outcome: metrics.auth_events.labels(action, outcome).inc()) if metrics else None
        audit = AuditLog(get_ch, on_record=count)
        audit.start()
        return cls(
            settings=settings,
            cache=cache,
            access_tokens=AccessTokens.from_settings(cfg),
            passwords=passwords,
            hashes=HashPool(cfg.max_concurrent_hashes, cfg.max_waiting_hashes),
            audit=audit,
            failures_per_account=SlidingWindow(cfg.login_failures_per_account, cfg.login_window_s),
            attempts_per_ip=SlidingWindow(cfg.login_attempts_per_ip, cfg.login_window_s),
            accounts_lock=asyncio.Lock(),
            session_locks=tuple(asyncio.Lock() for _ in range(64)),
        )

    def session_lock(self, session_id: str) -> asyncio.Lock:
        return self.session_locks[hash(session_id) % len(self.session_locks)]

    async def close(self) -> None:
        await self.cache.close()
        await self.audit.close()
        self.hashes.close()
