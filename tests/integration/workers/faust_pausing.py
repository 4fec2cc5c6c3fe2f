"""A Faust app whose agent pauses its partition for a moment mid-stream, as Faust's own table
recovery and rebalances do, while the consumer is still handing out an already fetched batch.

Run as ``faust_pausing.py worker``. Broker settings come from SPENDSTREAM_* variables through
``spendstream.kafka.faust_settings``; the app id and source topic (one partition) from
PAUSING_APP_ID / PAUSING_TOPIC. The app is ``stream_processors.runtime.consumer.StageApp``, what every
stage runs.

The test's records arrive in one fetched batch; Faust's fetch loop hands them to the stream
buffer and lets the agent run every 100 records, so it is still inside that batch when the agent
(at offset PAUSING_AT) pauses the partition. Faust's consumer drops the batch's remaining records
while the partition is paused; the test checks that every offset still reaches the agent before
it is committed.

``GET /seen/`` returns the offsets the agent received, in order.
"""

from __future__ import annotations

import asyncio
import os

from faust.types import TP
from worker_app import app_options  # this folder (see worker_app.py)

from spendstream.settings import Settings
from stream_processors.runtime.consumer import StageApp

settings = Settings()
app = StageApp(os.environ["PAUSING_APP_ID"], **app_options(settings))
topic = app.topic(os.environ["PAUSING_TOPIC"], key_serializer="raw", value_serializer="raw", partitions=1)
pause_at = int(os.environ["PAUSING_AT"])
#: long enough for the fetch loop to walk the rest of its batch while the partition is paused
PAUSE_S = 0.3
seen: list[int] = []


@app.agent(topic)
async def record_offsets(stream):
    async for event in stream.events():
        seen.append(event.message.offset)
        if event.message.offset == pause_at and seen.count(pause_at) == 1:
            tp = TP(event.message.topic, event.message.partition)
            app.consumer.pause_partitions({tp})
            await asyncio.sleep(PAUSE_S)
            app.consumer.resume_partitions({tp})


@app.page("/seen/")
async def show_seen(web, request):
    return web.json({"seen": seen})


if __name__ == "__main__":
    app.main()
