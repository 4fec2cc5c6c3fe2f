"""A consumer-group member in its own process, for kill -9 tests.

Usage: committing_consumer.py BOOTSTRAP PROFILE TOPIC GROUP

It reads one batch at a time, commits it, prints ``{"committed": {partition: next_offset}}`` and
then waits for a line on stdin before reading the next batch, so the test decides exactly how
far it gets before being killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiokafka import AIOKafkaConsumer

from spendstream.kafka import consumer_kwargs
from spendstream.settings import Settings


async def main(bootstrap: str, profile: str, topic: str, group: str) -> None:
    settings = Settings(kafka={"bootstrap_servers": bootstrap, "profile": profile})
    consumer = AIOKafkaConsumer(topic, **consumer_kwargs(settings, group, max_poll_records=10))
    await consumer.start()
    loop = asyncio.get_running_loop()
    while True:
        batches = await consumer.getmany(timeout_ms=200)
        records = [r for batch in batches.values() for r in batch]
        if not records:
            continue
        await consumer.commit()
        committed = {tp.partition: await consumer.committed(tp) for tp in batches}
        print(json.dumps({"committed": committed, "records": len(records)}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
