"""A small Faust app for the table restart-recovery test: counts events per key in a Table.

Run as ``faust_counter.py worker``. Broker settings come from SPENDSTREAM_* variables through
``spendstream.kafka.faust_settings`` (so the embedded profile is what is being tested); the app id
and source topic from COUNTER_APP_ID / COUNTER_TOPIC.

Each event is ``{"seq": n}`` with n = 1, 2, ... per key. Redelivery after a crash is normal under
at-least-once, so the table keeps ``[count, last_seq]`` and skips seqs it has already counted:
the counts are exact only if the table's changelog recovery lost nothing.

COUNTER_DELAY_MS slows each event down so the test can kill the worker mid-stream.
``GET /counts/`` returns the table, how many events this process handled, and whether the
worker is assigned and recovered.
"""

from __future__ import annotations

import asyncio
import os

import faust
from worker_app import app_options  # this folder (see worker_app.py)

from spendstream.settings import Settings

settings = Settings()
app = faust.App(os.environ["COUNTER_APP_ID"], **app_options(settings))
events = app.topic(os.environ["COUNTER_TOPIC"], key_serializer="raw", value_serializer="json")
counts = app.Table("counts", partitions=settings.kafka.partitions)
delay_s = int(os.environ.get("COUNTER_DELAY_MS", "0")) / 1000
handled = 0
#: per key, the table value this process found before it applied its first event of that key:
#: in a restarted worker, what the changelog recovery restored
recovered: dict[str, list[int]] = {}
#: per source partition, the offset of the first event this process received
first_offsets: dict[int, int] = {}


@app.agent(events)
async def count(stream):
    global handled
    async for event in stream.events():
        key = event.key.decode()
        seq = event.value["seq"]
        counted, last_seq = counts.get(key, (0, 0))
        recovered.setdefault(key, [counted, last_seq])
        first_offsets.setdefault(event.message.partition, event.message.offset)
        if seq > last_seq:
            counts[key] = [counted + 1, seq]
        handled += 1
        if delay_s:
            await asyncio.sleep(delay_s)


@app.page("/counts/")
async def show_counts(web, request):
    ready = bool(app.consumer.assignment()) and not app.rebalancing and not app.tables.recovery.in_recovery
    return web.json(
        {
            "counts": dict(counts.items()),
            "recovered": recovered,
            "first_offsets": first_offsets,
            "handled": handled,
            "ready": ready,
        }
    )


if __name__ == "__main__":
    app.main()
