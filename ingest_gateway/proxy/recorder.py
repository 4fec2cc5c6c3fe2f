"""Every proxied call becomes one usage event on usage.raw, without delaying the response.

``record`` hands the event to a background task that publishes it through the gateway's
publisher (the same path, envelopes and acks as ``POST /v1/events``). When the broker does not
acknowledge (down, restarting, saturated), the event goes to a local spool on disk instead, and a
drain task publishes the spool once the publisher is usable again: no proxied call is lost to a
broker outage. The spool is bounded (``proxy.spool_max_bytes``); an event that does not fit is
dropped and counted (``spendstream_proxy_events_dropped``), never held in memory.

Spool layout: ``<data_dir>/proxy-spool/<instance>/`` holds NDJSON segments (one line per event:
tenant, received_at, event) and a ``lock`` file the instance keeps an exclusive ``flock`` on.
At start an instance adopts the segments of every instance directory whose lock it can take
(its owner died), so events spooled before a crash are sent by the next process. The event id is
the proxy's request id, so an event published twice (sent, then re-sent from the spool after a
lost ack) is dropped by the pricing stage's dedupe.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import orjson

from ingest_gateway.errors import GatewayError
from ingest_gateway.publisher import Publisher

log = logging.getLogger(__name__)

#: publishes waiting for acks; beyond, new events go to the spool straight away (bounded memory)
MAX_PENDING = 10_000
DRAIN_INTERVAL_S = 0.5
DRAIN_BATCH = 500


class Spool:
    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        name = uuid.uuid4().hex
        # locked before it gets the name other instances look at, so none adopts it meanwhile
        making = root / f".new-{name}"
        making.mkdir(parents=True)
        self._lock = open(making / "lock", "w")  # noqa: SIM115 - held for the instance's life
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.dir = root / name
        making.rename(self.dir)
        self._seq = 0
        self.bytes = 0
        self._adopt()
        self.bytes = sum(p.stat().st_size for p in self.segments())

    def _adopt(self) -> None:
        for other in self.root.iterdir():
            if other == self.dir or not other.is_dir() or other.name.startswith("."):
                continue
            try:
                with open(other / "lock", "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    for segment in sorted(other.glob("*.ndjson")):
                        segment.rename(self.dir / f"adopted-{other.name}-{segment.name}")
                    (other / "lock").unlink(missing_ok=True)
                other.rmdir()
            except (BlockingIOError, OSError):
                continue  # alive (locked), or gone meanwhile

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.ndjson"))

    def append(self, lines: list[bytes]) -> int:
        """Write what fits; returns how many lines were written."""
        fitting = []
        for line in lines:
            if self.bytes + len(line) + 1 > self.max_bytes:
                break
            fitting.append(line)
            self.bytes += len(line) + 1
        if fitting:
            self._seq += 1
            path = self.dir / f"{os.getpid()}-{self._seq:012d}.ndjson"
            with open(path, "ab") as f:
                f.write(b"\n".join(fitting) + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return len(fitting)

    def close(self) -> None:
        self._lock.close()  # releases the flock: another instance may adopt what is left


class Recorder:
    def __init__(self, publisher: Publisher, spool: Spool, metrics: Any):
        self._publisher = publisher
        self._spool = spool
        self._metrics = metrics
        self._pending: set[asyncio.Task[None]] = set()
        self._drainer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._drainer = asyncio.create_task(self._drain_forever(), name="proxy-spool-drain")

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=5)
        for task in list(self._pending):  # still unacknowledged: spooled, as for a broker outage
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
        self._spool.close()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, tenant: str, received_at: str, event: dict[str, Any]) -> None:
        """Publish in the background (or spool); returns at once."""
        if len(self._pending) >= MAX_PENDING:
            self._to_spool([(tenant, received_at, event)])
            return
        task = asyncio.get_running_loop().create_task(self._publish(tenant, received_at, event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, tenant: str, received_at: str, event: dict[str, Any]) -> None:
        try:
            await self._publisher.publish(tenant, received_at, {event["project"]: [event]}, 1)
        except (GatewayError, asyncio.CancelledError) as exc:
            self._to_spool([(tenant, received_at, event)])
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._metrics.published.inc()

    def _to_spool(self, items: list[tuple[str, str, dict[str, Any]]]) -> None:
        lines = [orjson.dumps({"tenant": t, "received_at": r, "event": e}) for t, r, e in items]
        try:
            written = self._spool.append(lines)
        except OSError as exc:
            log.error("proxy spool write failed (%r): %d usage events dropped", exc, len(lines))
            written = 0
        self._metrics.spooled.inc(written)
        if written < len(lines):
            self._metrics.dropped.inc(len(lines) - written)
            log.error(
                "proxy spool full (%d bytes): %d usage events dropped", self._spool.max_bytes, len(lines) - written
            )

    async def _drain_forever(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_INTERVAL_S)
            if not self._spool.segments() or not await self._publisher.ready():
                continue
            try:
                await self.drain()
            except Exception:  # noqa: BLE001 - the next round retries; the spool keeps the events
                log.exception("proxy spool drain failed")

    async def drain(self) -> int:
        """Publish spooled events, segment by segment; a segment is deleted once all its events
        were acknowledged. Returns how many were sent."""
        sent = 0
        for segment in self._spool.segments():
            items = [orjson.loads(line) for line in segment.read_bytes().splitlines() if line.strip()]
            for start in range(0, len(items), DRAIN_BATCH):
                part = items[start : start + DRAIN_BATCH]
                groups: dict[tuple[str, str], dict[str, list[Any]]] = {}
                for item in part:
                    ev = item["event"]
                    groups.setdefault((item["tenant"], item["received_at"]), {}).setdefault(ev["project"], []).append(
                        ev
                    )
                for (tenant, received_at), by_project in groups.items():
                    n = sum(len(v) for v in by_project.values())
                    await self._publisher.publish(tenant, received_at, by_project, n)  # raises: segment stays
                sent += len(part)
            self._spool.bytes -= segment.stat().st_size
            segment.unlink()
            self._metrics.published.inc(len(items))
            self._metrics.drained.inc(len(items))
        return sent
