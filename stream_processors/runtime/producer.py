"""The producer a stage writes its output with (priced records, dead letters).

Not Faust's producer: in the embedded profile that one sends one record per batch (so table
changelogs recover, see spendstream/kafka.py) and tops out near 2k records/s. This one batches
normally (acks=all) and is awaited: a stage acks its input only after ``send_all`` returned.

Records are zstd-compressed: a priced record is its raw record plus a cost breakdown per event,
up to ~2.7x the raw size, so a raw record near the gateway's 512 KiB cut would exceed the 1 MiB
default request limit uncompressed; compressed JSON is 4-8x smaller, which is also what the
broker checks against its message size limit. ``MAX_RECORD_BYTES`` is the uncompressed limit.
Why zstd: aiokafka compresses lz4 at level 9 (LZ4 HC) with no way to lower it, which was a third
of the pricing stage's CPU; on 1 MiB batches of priced records zstd (level 3) measured 0.67 µs
per event at a 0.053 ratio against lz4-9's 3.8 µs at 0.073 (bench/bench_stage_pricing.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from spendstream.kafka import producer_kwargs
from spendstream.settings import Settings
from stream_processors.runtime.retry import retry_forever

#: (topic, partition, key, value) or (topic, partition, key, value, headers)
OutRecord = tuple[str, int, bytes | None, bytes] | tuple[str, int, bytes | None, bytes, list[tuple[str, bytes]]]

MAX_RECORD_BYTES = 16 * 1024 * 1024


class StageProducer:
    def __init__(self, settings: Settings, stage: str):
        self._settings = settings
        self._stage = stage
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is None:
            self._producer = AIOKafkaProducer(
                **producer_kwargs(
                    self._settings, client_id=f"spendstream-{self._stage}", compression_type="zstd",
                    max_request_size=MAX_RECORD_BYTES,
                )
            )  # fmt: skip
            await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def send_all(self, records: Sequence[OutRecord]) -> None:
        """Send every record and wait for all acks; on a Kafka error send them all again.

        Records go out as one batch per (topic, partition) in their order (aiokafka's
        ``send_batch``: a few µs per record instead of ~15 for ``send``). Re-sending can duplicate
        records written before the error; consumers of stage outputs tolerate that (priced
        records are dropped by the src watermark).

        Kafka errors are retried as ``retry.is_transient`` says (KafkaTimeoutError too: it says
        retriable=False but means "no broker answered in time"). A record the broker or the batch
        refuses as too large raises a data error instead, which sending again cannot cure. The pricing
        stage checks its output against :data:`MAX_RECORD_BYTES` first and dead-letters what
        exceeds it; anywhere else the error stops the stage (records are sent in batches, so
        the ones before it may be out already)."""
        if not records:
            return
        assert self._producer is not None, "start() first"
        producer = self._producer
        by_destination: dict[tuple[str, int], list[OutRecord]] = {}
        for record in records:
            by_destination.setdefault((record[0], record[1]), []).append(record)
        async for attempt in retry_forever(self._stage, "kafka send"):
            with attempt:
                futures = []
                for (topic, partition), group in by_destination.items():
                    batch = producer.create_batch()
                    for _, _, key, value, *headers in group:
                        record = {
                            "key": key,
                            "value": value,
                            "timestamp": None,
                            "headers": headers[0] if headers else None,
                        }
                        if batch.append(**record) is None:
                            futures.append(await producer.send_batch(batch, topic, partition=partition))
                            batch = producer.create_batch()
                            if batch.append(**record) is None:
                                raise MessageSizeTooLargeError(f"a {len(value)}-byte record does not fit a batch")
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                await asyncio.gather(*futures)
