"""The one refresh discipline of the in-memory snapshots (API keys, memberships): reloads never
overlap, a caller that must see a recent write never joins a reload that began before it, and a
miss reloads early at most once per interval."""

from __future__ import annotations

import asyncio
import time

from spendstream.reloading import Reloader


class Source:
    """A table whose reads take ``delay`` and return the version current when the read began."""

    def __init__(self, delay: float = 0.0) -> None:
        self.version = 0
        self.seen = -1
        self.delay = delay
        self.reads = 0
        self.concurrent = 0
        self.max_concurrent = 0

    async def reload_once(self) -> None:
        self.reads += 1
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        read = self.version
        try:
            await asyncio.sleep(self.delay)
            self.seen = read
        finally:
            self.concurrent -= 1


async def test_callers_join_the_running_reload_and_reloads_never_overlap() -> None:
    source = Source(delay=0.05)
    reloader = Reloader(source.reload_once, name="t", refresh_s=60)
    await asyncio.gather(*(reloader.reload() for _ in range(20)))
    assert source.reads == 1 and source.max_concurrent == 1


async def test_a_write_after_a_reload_began_is_seen_by_reload_after_write() -> None:
    source = Source(delay=0.05)
    reloader = Reloader(source.reload_once, name="t", refresh_s=60)
    early = asyncio.create_task(reloader.reload())  # reads version 0
    await asyncio.sleep(0.01)
    source.version = 1  # a write lands while that read is in flight
    await reloader.reload_after_write()
    assert source.seen == 1, "joined a reload that read before the write"
    await early
    assert source.reads == 2 and source.max_concurrent == 1


async def test_waiters_after_a_stale_reload_share_one_fresh_reload() -> None:
    source = Source(delay=0.05)
    reloader = Reloader(source.reload_once, name="t", refresh_s=60)
    stale = asyncio.create_task(reloader.reload())
    await asyncio.sleep(0.01)
    source.version = 1
    await asyncio.gather(*(reloader.reload_after_write() for _ in range(10)))
    await stale
    assert source.seen == 1 and source.reads == 2 and source.max_concurrent == 1


async def test_misses_reload_at_most_once_per_interval() -> None:
    source = Source()
    reloader = Reloader(source.reload_once, name="t", refresh_s=60, miss_reload_s=10)
    assert await reloader.reload_on_miss() is True
    assert [await reloader.reload_on_miss() for _ in range(50)] == [False] * 50
    assert source.reads == 1


async def test_simultaneous_misses_share_one_reload_and_all_find_the_row() -> None:
    source = Source(delay=0.05)
    reloader = Reloader(source.reload_once, name="t", refresh_s=60, miss_reload_s=10)
    source.version = 1
    assert await asyncio.gather(*(reloader.reload_on_miss() for _ in range(10))) == [True] * 10
    assert source.reads == 1 and source.seen == 1


async def test_a_miss_waits_at_most_miss_wait_s() -> None:
    source = Source(delay=5)
    reloader = Reloader(source.reload_once, name="t", refresh_s=60, miss_wait_s=0.05)
    started = time.monotonic()
    assert await reloader.reload_on_miss() is False
    assert time.monotonic() - started < 1
    await reloader.close()


async def test_background_refresh_runs_every_refresh_s_and_close_stops_it() -> None:
    source = Source()
    reloader = Reloader(source.reload_once, name="t", refresh_s=0.02)
    await reloader.start()
    source.version = 3
    await asyncio.sleep(0.15)
    assert source.seen == 3 and source.reads >= 3
    await reloader.close()
    reads = source.reads
    await asyncio.sleep(0.06)
    assert source.reads == reads
