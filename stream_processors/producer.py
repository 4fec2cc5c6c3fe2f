"""The producer a stage writes its output with (priced records, dead letters).

Not Faust's producer: in the embedded profile that one sends one record per batch (so table
changelogs recover, see spendstream/kafka.py) and tops out near 2k records/s. This one batches
normally (acks=all) and is awaited: a stage acks its input only after ``send_all`` returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from spendstream.kafka import producer_kwargs
from spendstream.settings import Settings
from stream_processors.retry import retry_forever

#: (topic, partition, key, value)
OutRecord = tuple[str, int, bytes | None, bytes]


class StageProducer:
    def __init__(self, settings: Settings, stage: str):
        self._settings = settings
        self._stage = stage
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self._producer is None:
            self._producer = AIOKafkaProducer(**producer_kwargs(self._settings, client_id=f"spendstream-{self._stage}"))
            await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def send_all(self, records: Sequence[OutRecord]) -> None:
        """Send every record and wait for all acks; on a Kafka error send them all again.

        Re-sending can duplicate records that were written before the error; consumers of
        stage outputs tolerate that (priced records are dropped by the src watermark)."""
        if not records:
            return
        assert self._producer is not None, "start() first"
        producer = self._producer
        async for attempt in retry_forever(self._stage, "kafka send", (KafkaError,)):
            with attempt:
                futures = [
                    await producer.send(topic, value, key=key, partition=partition)
                    for topic, partition, key, value in records
                ]
                await asyncio.gather(*futures)
