"""Every proxied call becomes one usage event on usage.raw, without delaying the response.

``record`` queues the event and returns. Every ``BATCH_S`` (0.1 s) the queued events go to the
gateway's publisher (the same path, envelopes and acks as ``POST /v1/events``), one record per
tenant/project with the first event's ``received_at`` on the envelope, as contracts.py has it
for coalesced requests: a produce request per proxied call cost the gateway more CPU than the
rest of the call (the broker connection's socket writes). A callback on the acks' future, not a
task per event, acts on the outcome. When the broker does not
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
import functools
import logging
import operator
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from ingest_gateway.errors import GatewayError
from ingest_gateway.logic import encode
from ingest_gateway.publisher import Publisher

log = logging.getLogger(__name__)

#: publishes waiting for acks; beyond, new events go to the spool straight away (bounded memory)
MAX_PENDING = 10_000
#: how long an event waits for others to share its record (the response never waits for it)
BATCH_S = 0.1
_tenant = operator.itemgetter(0)
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


def _grouped(items: Iterable[Any], key: Callable[[Any], str]) -> dict[str, list[Any]]:
    """``items`` by ``key(item)``, in order."""
    groups: dict[str, list[Any]] = {}
    for item in items:
        k = key(item)
        group = groups.get(k)
        if group is None:
            groups[k] = [item]
        else:
            group.append(item)
    return groups


def _project(event: Any) -> str:
    return event["project"] if type(event) is dict else event.project


def _by_project(items: list[tuple[str, str, Any]]) -> dict[str, list[Any]]:
    return _grouped((event for _, _, event in items), _project)


class Recorder:
    def __init__(self, publisher: Publisher, spool: Spool, metrics: Any):
        self._publisher = publisher
        self._spool = spool
        self._metrics = metrics
        #: the acks' futures of events handed to the publisher
        self._futures: set[asyncio.Future[None]] = set()
        #: tasks waiting for the broker to be usable (``Publisher.publish``) to hand events over
        self._pending: set[asyncio.Task[None]] = set()
        #: events recorded and not yet acknowledged nor spooled (queued ones included)
        self._publishing = 0
        #: recorded since the last flush, and the flush's timer
        self._queue: list[tuple[str, str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._drainer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._drainer = asyncio.create_task(self._drain_forever(), name="proxy-spool-drain")

    async def close(self) -> None:
        self._flush()
        waiting = [*self._pending, *self._futures]
        if waiting:
            await asyncio.wait(waiting, timeout=5)
        # still unacknowledged: spooled, as for a broker outage
        for task in list(self._pending):
            task.cancel()
        for future in list(self._futures):
            future.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await asyncio.sleep(0)  # the cancelled futures' callbacks (``_acked``) run
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
        self._spool.close()

    @property
    def pending(self) -> int:
        """Events recorded and not yet acknowledged by the broker nor spooled."""
        return self._publishing

    def record(self, tenant: str, received_at: str, event: Any) -> None:
        """Publish in the background (or spool); returns at once. ``event``: a validated contract
        v1 event (``logic.Event``, or its dict)."""
        if self._publishing >= MAX_PENDING:
            self._to_spool([(tenant, received_at, event)])
            return
        self._publishing += 1
        self._queue.append((tenant, received_at, event))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BATCH_S, self._flush)

    def _flush(self) -> None:
        """The queued events to the publisher, one hand-over per tenant."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._queue = self._queue, []
        for tenant, group in _grouped(items, _tenant).items():
            try:
                future = self._publisher.submit(tenant, group[0][1], _by_project(group), len(group))
            except GatewayError:  # saturated: the broker is not acknowledging fast enough
                self._publishing -= len(group)
                self._to_spool(group)
                continue
            if future is None:  # the broker is not usable at this moment: publish waits for it a while
                task = asyncio.get_running_loop().create_task(self._publish(group))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                continue
            self._futures.add(future)
            future.add_done_callback(functools.partial(self._acked, group))

    def _acked(self, items: list[tuple[str, str, Any]], future: asyncio.Future[None]) -> None:
        self._futures.discard(future)
        self._publishing -= len(items)
        if future.cancelled() or future.exception() is not None:
            self._to_spool(items)
        else:
            self._metrics.published.inc(len(items))

    async def _publish(self, items: list[tuple[str, str, Any]]) -> None:
        tenant, received_at, _ = items[0]
        try:
            await self._publisher.publish(tenant, received_at, _by_project(items), len(items))
        except (GatewayError, asyncio.CancelledError) as exc:
            self._to_spool(items)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            self._publishing -= len(items)
        self._metrics.published.inc(len(items))

    def _to_spool(self, items: list[tuple[str, str, dict[str, Any]]]) -> None:
        lines = [encode({"tenant": t, "received_at": r, "event": e}) for t, r, e in items]
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
