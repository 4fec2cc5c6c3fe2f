"""In-memory snapshots of a table, reloaded in the background and on a miss.

Services keep small configuration tables (API keys, memberships, provider keys, project rules) in
memory so no request reads ClickHouse. :class:`Reloader` holds the one way they are refreshed:

- every ``refresh_s`` in a background task, while the last good snapshot keeps serving when a
  load fails (the owner's ``reload_once`` decides what a failure keeps);
- on demand, joining a reload already running rather than starting a second one. Reloads never
  overlap, so an older read can't land after a newer one;
- ``started_after``: a caller that must see a row written before a moment (a key created just
  now, a write this process made) joins only a reload that began at or after it; a reload that
  began earlier may have read before the row existed, so it is waited out and another started;
- ``reload_on_miss``: a lookup that found nothing reloads early, at most once per
  ``miss_reload_s``, waiting at most ``miss_wait_s``, so a hostile caller presenting unknown ids
  can't turn every request into a ClickHouse read; misses meanwhile join the reload still running
  (simultaneous first uses of a new key all succeed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Reloader:
    def __init__(
        self,
        reload_once: Callable[[], Awaitable[None]],
        *,
        name: str,
        refresh_s: float,
        miss_reload_s: float = 0.5,
        miss_wait_s: float = 2.0,
    ) -> None:
        self._reload_once = reload_once
        self._name = name
        self.refresh_s = refresh_s
        self._miss_reload_s = miss_reload_s
        self._miss_wait_s = miss_wait_s
        self._running: asyncio.Task[None] | None = None
        self._running_started = 0.0
        self._last_miss = float("-inf")
        self._miss_reload: asyncio.Future[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load once (failures are the owner's to handle), then refresh in the background."""
        await self.reload()
        self._loop_task = asyncio.create_task(self._refresh_forever(), name=self._name)

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, self._miss_reload, self._running) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.reload()

    async def reload(self, *, started_after: float | None = None) -> None:
        """Reload now, or join the reload running (only one that began at or after
        ``started_after``, a ``time.monotonic()`` value, when given)."""
        while True:
            task = self._running
            if task is None or task.done():
                self._running_started = time.monotonic()
                task = self._running = asyncio.create_task(self._reload_once())
                break
            if started_after is None or self._running_started >= started_after:
                break
            await asyncio.shield(task)  # began too early: wait it out, then look again
        await asyncio.shield(task)

    async def reload_after_write(self) -> None:
        """Reload so that a write that just returned is seen."""
        await self.reload(started_after=time.monotonic())

    async def reload_on_miss(self) -> bool:
        """A lookup missed: reload (rate-limited), or join the miss reload still running. True when
        that reload finished within ``miss_wait_s``, so looking again is worth it."""
        now = time.monotonic()
        miss = self._miss_reload
        if now - self._last_miss >= self._miss_reload_s:
            self._last_miss = now
            miss = self._miss_reload = asyncio.ensure_future(self.reload(started_after=now))
        elif miss is None or miss.done():
            return False  # rate-limited, and no miss reload left to join
        # (a miss reload still running is joined: simultaneous first uses of a new row all find it)
        try:
            await asyncio.wait_for(asyncio.shield(miss), self._miss_wait_s)
        except TimeoutError:
            return False
        return True
